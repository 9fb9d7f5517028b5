"""Experiment logging: CSV always, Weights & Biases offline unless the user has configured it, quiet consoles.

W&B with no network either hangs (``wandb.init`` waits 90 s for the server, then raises and the run is lost)
or fails after a few seconds without an API key. A researcher on a cluster node without network access must
still get a complete run, quickly. So:

- unless W&B was configured (``WANDB_MODE`` set, ``WANDB_API_KEY`` set, or a stored login in ``~/.netrc``),
  symstitch sets ``WANDB_MODE=offline``: runs land in ``<run dir>/wandb/offline-run-*`` and ``wandb sync``
  uploads them later;
- when it was configured for online use, the W&B server is probed once per process with a TCP connection of at
  most :data:`PROBE_SECONDS`; if it cannot be reached, the process switches to offline with a warning, and so it
  does, with the server's reason in one line, when the server refuses the credentials (a wrong key);
- ``WANDB_INIT_TIMEOUT`` defaults to :data:`INIT_TIMEOUT` seconds (W&B's own default is 90);
- the W&B runs of a sweep (its cells', its fits', its report's) share one group, the sweep folder's name
  (:func:`wandb_group`, :func:`wandb_grouping`, :func:`wandb_run`).

:func:`quiet` keeps the console to what a researcher needs: Lightning's own banners, tips and summaries (and a
few known harmless warnings) only with ``-v``.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
import logging
import netrc
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

#: Folder for runs when nothing else is said (``trainer.default_root_dir`` moves it).
DEFAULT_RUN_DIR = "runs"
#: seconds a TCP connection to the W&B server may take before symstitch goes offline
PROBE_SECONDS = 3.0
#: W&B's own limit for ``wandb.init`` (seconds), unless the user set ``WANDB_INIT_TIMEOUT``
INIT_TIMEOUT = "15"
#: the W&B project of every symstitch run
WANDB_PROJECT = "symstitch"

_probed: dict[str, bool] = {}


def wandb_configured() -> bool:
    """True when the user has chosen a W&B mode or stored credentials."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    rc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return rc.is_file() and netrc.netrc(rc).authenticators("api.wandb.ai") is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_server_reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the W&B server ``url`` opens within ``timeout`` seconds (cached)."""
    if url not in _probed:
        parsed = urlparse(url if "://" in url else f"https://{url}")
        port = parsed.port or (80 if parsed.scheme == "http" else 443)
        try:
            with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
                _probed[url] = True
        except OSError:
            _probed[url] = False
    return _probed[url]


def default_wandb_offline() -> None:
    """Choose how W&B runs (see the module docstring): offline unless configured; offline with a warning when
    configured but the server cannot be reached; never longer than a few seconds to decide."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_INIT_TIMEOUT", INIT_TIMEOUT)
    if not wandb_configured():
        os.environ["WANDB_MODE"] = "offline"
        return
    if os.environ.get("WANDB_MODE", "online") not in ("online", "run"):
        return  # offline, disabled, dryrun: nothing to reach
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not wandb_server_reachable(url):
        os.environ["WANDB_MODE"] = "offline"
        print(f"symstitch: warning: the W&B server {url} cannot be reached (no network?); logging offline — "
              "upload later with `wandb sync <run dir>/wandb/offline-run-*`", file=sys.stderr, flush=True)
        return
    refused = wandb_credentials_refused(url)
    if refused:
        os.environ["WANDB_MODE"] = "offline"
        print(f"symstitch: warning: the W&B server {url} refused the credentials ({refused}); logging offline — "
              "fix them with `wandb login --relogin`, then upload with `wandb sync <run dir>/wandb/offline-run-*`",
              file=sys.stderr, flush=True)


_verified: dict[str, Optional[str]] = {}


def wandb_credentials_refused(url: str) -> Optional[str]:
    """Why the W&B server at ``url`` refuses the configured credentials (``WANDB_API_KEY`` or a stored login), in
    one line; None when it accepts them (asked once per process, within :data:`PROBE_SECONDS` … W&B's own timeout)."""
    if url not in _verified:
        import wandb  # only when W&B is configured for online use

        try:
            wandb.Api(api_key=os.environ.get("WANDB_API_KEY"), overrides={"base_url": url},
                      timeout=int(max(PROBE_SECONDS, 5)))
            _verified[url] = None
        except Exception as err:  # noqa: BLE001 - any refusal (bad key, malformed key, server error) goes offline
            _verified[url] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'}"
    return _verified[url]


def default_loggers(name: str, project: str = WANDB_PROJECT) -> list[dict]:
    """Trainer ``logger`` default: a CSV logger and a W&B logger, both under the run folder."""
    return [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": DEFAULT_RUN_DIR, "name": name}},
        {"class_path": "symstitch.lightning_adapters.QuietWandbLogger",
         "init_args": {"save_dir": DEFAULT_RUN_DIR, "project": project}},
    ]


def wandb_group(folder: Path | str) -> str:
    """The W&B group of a sweep's runs, and of its report: the name of the sweep's folder."""
    return Path(folder).resolve().name


@contextlib.contextmanager
def wandb_grouping(group: str, job_type: str) -> Iterator[None]:
    """While the block runs, every W&B logger built in it (e.g. by a sweep cell's fit, when its ``fit_args`` log to
    W&B) joins ``group`` as ``job_type`` unless it names its own (:func:`current_wandb_grouping`). Passed to
    ``wandb.init`` as arguments, not through W&B's ``WANDB_RUN_GROUP``, which W&B reads once per process: a
    second sweep in the same process would keep the first one's group."""
    token = _GROUPING.set((group, job_type))
    try:
        yield
    finally:
        _GROUPING.reset(token)


def current_wandb_grouping() -> Optional[tuple[str, str]]:
    """``(group, job_type)`` of the enclosing :func:`wandb_grouping`, None outside any."""
    return _GROUPING.get()


_GROUPING: ContextVar[Optional[tuple[str, str]]] = ContextVar("symstitch_wandb_grouping", default=None)


@contextlib.contextmanager
def wandb_run(folder: Path | str, **init: Any) -> Iterator[Any]:
    """One W&B run of the symstitch project in ``<folder>/wandb`` (offline unless configured: see
    :func:`default_wandb_offline`), finished when the block ends; ``init``: more arguments of ``wandb.init``
    (``name``, ``group``, ``job_type``, ``config``, ``id``)."""
    default_wandb_offline()
    import wandb  # only here: importing W&B takes seconds

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=WANDB_PROJECT, dir=str(folder), **init)
    try:
        yield run
    finally:
        run.finish()


def finish_wandb() -> None:
    """Close a live W&B run, so the next run in this process starts a fresh one."""
    wandb = sys.modules.get("wandb")  # never imported here: W&B costs seconds and may not be in use
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


#: messages that say nothing about the user's run (each checked: the frozen networks are in eval mode on
#: purpose; the others are library housekeeping)
_NOISE = (
    r"Found \d+ module\(s\) in eval mode",
    r".*LeafSpec",
    r"The '\w+_dataloader' does not have many workers",
    r".*does not have many workers",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"You defined a `validation_step` but have no `val_dataloader`",
    r"LightningCLI's args parameter is intended to run from within Python",
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",
)
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning")


class _ConsoleHandler(logging.StreamHandler):
    """The process's console handler: Lightning's info messages only when verbose."""

    verbose = False

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.verbose and record.levelno < logging.WARNING and record.name.startswith(_LIGHTNING_LOGGERS):
            return False
        return super().filter(record)


_chosen = False  # whether the console was set up, by a command or by the user


def quiet_by_default() -> None:
    """From Python, the console of the commands: quiet, unless the user chose otherwise first (``quiet(verbose=True)``,
    or ``symstitch.verbose()``). Every entry point that runs Lightning calls this."""
    if not _chosen:
        quiet()


def verbose() -> bool:
    """Whether the console was asked for Lightning's own messages (``-v``; False until :func:`quiet` is called)."""
    return _ConsoleHandler.verbose


def quiet(verbose: bool = False) -> None:
    """Lightning's info messages (device banners, tips, model summaries, FLOP counts) and known harmless
    warnings off, unless ``verbose``. Errors and real warnings always show.

    Lightning sets its loggers to INFO (with console handlers of its own) when it is imported: call this after
    importing it. A root console handler is installed too, filtering what Lightning sends up to it."""
    global _chosen
    _chosen = True
    _ConsoleHandler.verbose = verbose
    root = logging.getLogger()
    if not any(isinstance(h, _ConsoleHandler) for h in root.handlers):
        root.addHandler(_ConsoleHandler())
    for name in _LIGHTNING_LOGGERS:
        if name in sys.modules:
            logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        return
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
