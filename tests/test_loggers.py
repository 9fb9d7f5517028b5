"""symstitch.loggers: Weights & Biases without a network or with a refused key goes offline in one line, and the
console stays quiet unless asked."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from symstitch.commands import main

from .conftest import cli_env


def test_wandb_key_without_network_goes_offline_at_once_and_logs_are_quiet(tmp_path, caplog):
    """WANDB_API_KEY set, the W&B server unreachable: a warning, an offline run, a complete fit; and none of
    Lightning's banners and tips, nor the known harmless warnings, unless -v."""
    env = {**cli_env(tmp_path), "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    fit = [sys.executable, "-m", "symstitch", "fit", "--model.init_args.arch", "mcnn",
           "--model.init_args.arch_kwargs", "{width: 0.125}", "--trainer.max_epochs", "1"]
    proc = subprocess.run(fit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cannot be reached" in proc.stderr and "logging offline" in proc.stderr
    assert list((tmp_path / "runs/wandb").glob("offline-run-*"))
    said = proc.stdout + proc.stderr
    for noise in ("Tip:", "GPU available", "LeafSpec", "in eval mode", "Total FLOPs", "wandb: WARNING",
                  "does not have many workers"):
        assert noise not in said, noise

    from symstitch import loggers  # -v: Lightning's own messages (in this process, then quiet again)

    caplog.set_level(logging.INFO)  # what Lightning's loggers let through reaches pytest's handler
    try:
        assert main(["-v", "fit", *fit[4:], "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]) == 0
        assert any("GPU available" in r.getMessage() for r in caplog.records)
    finally:
        loggers.quiet(False)


def test_a_refused_wandb_key_goes_offline_in_one_line(monkeypatch, capsys):
    """A W&B server that answers but refuses the key (a loopback stand-in answering 401): one warning line with the
    server's reason, and the process logs offline instead of ending in W&B's traceback."""
    import http.server
    import threading

    from symstitch import loggers

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"errors": [{"message": "invalid api key"}]}')

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    try:
        loggers.default_wandb_offline()
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert os.environ["WANDB_MODE"] == "offline"
    assert f"the W&B server {url} refused the credentials" in err and "invalid api key" in err
    assert len(err.strip().splitlines()) == 1
