"""`mmgrpo demo RUN_DIR`: every check before the server starts, then the server.

Order: Gradio installed, --share possible, the run directory, its checkpoint, the modality's extra
(building the adapter); each failure is one ConfigError line (the CLI prints it and exits 2) and no
server starts. The page binds 127.0.0.1 unless --host says otherwise and serves files from the run
directory and its own temporary folder only.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from mmgrpo.config import ConfigError

SHARE_SERVER = ("api.gradio.app", 443)  # where Gradio asks for a share link


def require_gradio() -> None:
    """Gradio is found (not imported yet: prepare_environment must come first)."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("the demo needs the package 'gradio', which is not installed: pip install 'mmgrpo[demo]'")


def internet_reachable(address: tuple[str, int] = SHARE_SERVER, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to `address` opens (name lookup included) within `timeout` seconds."""
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


def check_share(share: bool, reachable: bool | None = None) -> None:
    if share and not (internet_reachable() if reachable is None else reachable):
        raise ConfigError(
            f"--share needs Gradio's share server ({SHARE_SERVER[0]}), which this machine cannot reach (no "
            "internet): drop --share and open the page on this machine, or reach it over SSH "
            "(ssh -L 7860:127.0.0.1:7860 HOST)"
        )


def prepare_environment() -> Path:
    """The demo's own temporary folder, and Gradio told to keep its cache there and not to phone home.
    Call before gradio is imported: it reads these settings at import."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    workdir = Path(tempfile.mkdtemp(prefix="mmgrpo-demo-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # the page's media go with the process
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")
    return workdir


def launch(run_dir: str | Path, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           checkpoint: str | None = None, threads: int | None = 1, block: bool = True) -> Any:
    """Check everything, then serve the demo of `run_dir`. Returns the Blocks (block=False: it keeps
    serving in a thread; call .close() to stop it).

    threads: torch's CPU threads for sampling. 1 by default: the embedded models are tiny, and on a
    shared 2-core machine a second thread made a comparison up to 10x slower (README, Demo)."""
    from mmgrpo.demo.policies import load_run

    require_gradio()
    check_share(share)
    run = load_run(run_dir, checkpoint, threads)
    workdir = prepare_environment()
    from mmgrpo.demo.app import SYNC_VIDEOS_JS, build_app

    demo = build_app(run, workdir / "media")
    demo.queue(default_concurrency_limit=1)  # one comparison at a time: the policies are shared
    demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(run.path.resolve()),
                str(workdir)], max_file_size="50mb", js=SYNC_VIDEOS_JS, prevent_thread_lock=True, quiet=True,
                show_error=True)
    if block:
        print(f"mmgrpo demo of {run.path} (checkpoint {run.checkpoint.name}) on {demo.local_url}"
              f"{f' and {demo.share_url}' if demo.share_url else ''}; Ctrl+C stops it", flush=True)
        demo.block_thread()  # until Ctrl+C; Gradio then closes the server
    return demo
