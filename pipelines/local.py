"""Run the whole pipeline on this machine with KFP's local runner (no cluster, no GPU)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from ftloop.components.artifacts import (
    REPORT_HTML,
    REPORT_MD,
    SUMMARY_FILE,
    charts_dir,
    predictions_dir,
    read_summary,
    write_summary,
)
from ftloop.components.config import BUILTIN_MODEL_REFS, TINY_MODEL_REF, RunConfig
from ftloop.components.disk import _writes_to
from ftloop.components.errors import FtloopError
from ftloop.components.records import content_hash
from ftloop.components.stages.prepare_examples import load_source
from ftloop.pipelines.console import TASKS_LOG, TaskConsole, count_tasks

RESULT_FILES = (SUMMARY_FILE, REPORT_MD, REPORT_HTML)
RESULT_DIRS = (predictions_dir, charts_dir)  # each: artifact dir -> the folder the run copies into the work dir


def ensure_tiny_model(config: RunConfig, workdir: Path, texts: list[str], labels: list[str], progress: Callable[[str], None]) -> RunConfig:
    """Replace ``builtin:tiny-phi3`` by a model directory built offline from this run's data."""
    if config.model.name_or_path != TINY_MODEL_REF:
        return config
    from ftloop.components.modeling.tiny import build_tiny_model, reusable_tiny_model

    model_dir = workdir / "models" / "tiny-phi3"
    # Reused only if it was completely written from this data, these labels and this seed.
    if reusable_tiny_model(model_dir, texts, labels, seed=config.seed):
        progress(f"tiny model: reusing {model_dir}")
    else:
        progress(f"tiny model: building a random-init Phi-3-architecture model in {model_dir}")
        build_tiny_model(model_dir, texts, labels, seed=config.seed, replace=True)
    return config.with_model_path(str(model_dir))


def resolve_builtin_model(config: RunConfig, progress: Callable[[str], None]) -> RunConfig:
    """Replace a fetched built-in model ref (``builtin:smollm2-135m-instruct``) by its cached model directory.

    Fetched and converted on first use (components/modeling/builtin.py), then reused; the directory
    is loaded exactly as a user's own model directory. ``builtin:tiny-phi3`` is left to ``ensure_tiny_model``.
    """
    from ftloop.components.modeling.builtin import ensure_builtin_model

    def fetched(ref: str) -> bool:
        return ref in BUILTIN_MODEL_REFS and ref != TINY_MODEL_REF

    ref = config.model.name_or_path
    if fetched(ref):
        model_dir = ensure_builtin_model(ref, progress=progress)
        progress(f"built-in model: using {model_dir} for {ref}")
        config = config.with_model_path(str(model_dir))
    hf = config.generators.hf
    if fetched(hf.name_or_path):  # the hf generator may run a built-in model too
        model_dir = ensure_builtin_model(hf.name_or_path, progress=progress)
        progress(f"built-in model: using {model_dir} for {hf.name_or_path} (generators.hf)")
        generators = config.generators.model_copy(update={"hf": hf.model_copy(update={"name_or_path": str(model_dir)})})
        config = config.model_copy(update={"generators": generators})
    return config


def check_base_model(config: RunConfig) -> None:
    """A local base model must be loadable before any stage starts; hub ids are checked when they are loaded."""
    from ftloop.components.modeling.loading import check_model_ref, load_tokenizer

    ref = config.model.name_or_path
    check_model_ref(ref)
    if Path(ref).is_dir():
        load_tokenizer(ref)  # chat template and a pad token distinct from eos
    # the generator backends that run: augment.backend only when the loop does (augment.rounds 0: augmentation off)
    if "hf" in (config.generate.backend if config.data.articles else None, config.augment.backend if config.augment.rounds else None):
        check_model_ref(config.generators.hf.name_or_path, key="generators.hf.name_or_path")


def support_oneof_artifacts_locally() -> None:
    """Let kfp.local resolve ``dsl.OneOf`` over artifacts, as the KFP backend does.

    kfp 2.17.3's local orchestrator resolves a OneOf over *parameters* (it takes
    the output of whichever branch ran) but refuses one over *artifacts*:
    ``ValueError: Expected 1 artifact in ArtifactSelectorSpec. Got: 2``
    (``kfp/local/orchestrator/orchestrator_utils.py``, ``get_dag_output_artifacts``).
    The augmentation loop hands each round's model and evaluation on through
    ``dsl.If``/``dsl.Else`` + ``dsl.OneOf``, so the local runner gets the same rule
    for artifacts that it already applies to parameters. Only the local runner
    is affected; compiled pipelines are unchanged. kfp is pinned (==2.17.3).
    """
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    if getattr(OrchestratorUtils.get_dag_output_artifacts, "_ftloop_oneof", False):
        return

    def get_dag_output_artifacts(cls, dag_outputs_spec, io_store):
        outputs = {}
        for key, spec in dag_outputs_spec.artifacts.items():
            found = []
            for selector in spec.artifact_selectors:
                try:
                    found.append(io_store.get_task_output(selector.producer_subtask, selector.output_artifact_key))
                except (KeyError, ValueError):
                    continue  # that branch did not run
            if len(found) != 1:
                raise ValueError(f"dsl.OneOf output {key!r}: expected exactly one branch to produce it, got {len(found)}")
            outputs[key] = found[0]
        return outputs

    get_dag_output_artifacts._ftloop_oneof = True  # type: ignore[attr-defined]
    OrchestratorUtils.get_dag_output_artifacts = classmethod(get_dag_output_artifacts)


PREVIOUS_DIR = "previous"  # where a new run moves the results of the run before it


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _check_result_paths(workdir: Path) -> None:
    """Something of the wrong kind where a result goes is not ftloop's to move or delete."""
    for name in RESULT_FILES:
        path = workdir / name
        if path.is_dir():
            raise FtloopError(
                f"{path}: is a directory, where the run writes its {name} file; move or remove it, or choose another --workdir"
            )
    for result_dir in RESULT_DIRS:
        folder = result_dir(workdir)
        if os.path.lexists(folder) and not folder.is_dir():
            raise FtloopError(
                f"{folder}: is not a directory, where the run writes its {folder.name}/ folder; "
                "move or remove it, or choose another --workdir"
            )


def _check_writable(workdir: Path) -> None:
    """Fail before anything is written: read-only mounts, immutable folders and missing permissions all show here."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".ftloop-write-check-", dir=workdir)
    except OSError as exc:
        raise FtloopError(
            f"{workdir}: the work directory is not writable: {_reason(exc)}; choose a writable --workdir (or make this one writable)"
        ) from None
    os.close(fd)
    os.unlink(probe)


def set_aside_previous_results(workdir: Path, progress: Callable[[str], None]) -> Path | None:
    """Move an earlier run's results to WORKDIR/previous/ so a failed or stopped run never leaves them looking current.

    summary.json goes first: it is what marks a work directory as holding a finished run.
    Only the latest earlier run is kept; what was in previous/ before is replaced.
    """
    found = [workdir / name for name in RESULT_FILES if os.path.lexists(workdir / name)]
    found += [result_dir(workdir) for result_dir in RESULT_DIRS if os.path.lexists(result_dir(workdir))]
    if not found:
        return None
    previous = workdir / PREVIOUS_DIR
    try:
        if previous.is_dir() and not previous.is_symlink():
            shutil.rmtree(previous)
        elif os.path.lexists(previous):
            previous.unlink()
        previous.mkdir()
        for path in found:
            os.replace(path, previous / path.name)
        (previous / "NOTE.txt").write_text(
            f"The results of the run before the one started in {workdir} at {time.strftime('%Y-%m-%d %H:%M:%S')}.\n"
            "They were moved here when that run started, so a failed run never leaves them looking current.\n"
            f"Re-render them with: ftloop report {previous}\n",
            encoding="utf-8",
        )
    except OSError as exc:
        raise FtloopError(
            f"{workdir}: cannot move the earlier run's results to {previous}: {_reason(exc)}; "
            "move or delete them yourself, or choose another --workdir"
        ) from None
    progress(f"moved the earlier run's {', '.join(p.name for p in found)} to {previous}")
    return previous


def prepare_workdir(workdir: Path, progress: Callable[[str], None], create: bool = True) -> None:
    """Make the work directory ready for a run, or fail with one line before anything is written.

    Without ``create`` a missing work directory is left missing (a config error must not create it).
    """
    if os.path.lexists(workdir) and not workdir.is_dir():
        raise FtloopError(f"{workdir}: cannot create work directory: a file of that name exists; choose another --workdir")
    if not workdir.exists():
        if not create:
            return
        try:
            workdir.mkdir(parents=True)
        except OSError as exc:
            raise FtloopError(f"{workdir}: cannot create work directory: {_reason(exc)}; choose another --workdir") from None
    _check_result_paths(workdir)
    _check_writable(workdir)
    set_aside_previous_results(workdir, progress)


def _remove_results(workdir: Path) -> None:
    for name in RESULT_FILES:
        with contextlib.suppress(OSError):
            (workdir / name).unlink(missing_ok=True)
    for result_dir in RESULT_DIRS:
        shutil.rmtree(result_dir(workdir), ignore_errors=True)


# ------------------------------------------------------------------ stopping: SIGTERM and SIGINT

STOP_GRACE_S = 20.0  # how long a stopped task may take to exit (fine-tune saves a checkpoint) before SIGKILL


class Terminated(BaseException):
    """SIGTERM (pod deletion, Spot preemption, ``kill``), raised in the main thread as SIGINT raises KeyboardInterrupt."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (once: the cleanup is not interrupted again)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_TASKS: set[subprocess.Popen] = set()
_CONSOLE: TaskConsole | None = None  # the quiet console of the running pipeline, if any
_TASKS_LOCK = threading.Lock()
_STOPPING = threading.Event()


def _run_task_subprocess(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
    """kfp.local's ``run_local_subprocess``, with each task in its own process group that ftloop can stop.

    kfp's own version waits for the task forever when ftloop is interrupted, and a task
    outlives a SIGTERM sent to ftloop alone; here every task is tracked until it exits.
    """
    env = {**os.environ, **env_vars} if env_vars else None
    with _TASKS_LOCK:
        if _STOPPING.is_set():
            return 143  # the run is being stopped: start nothing new (a retry, another ParallelFor branch)
        process = subprocess.Popen(
            full_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env, process_group=0
        )
        _TASKS.add(process)
    try:
        assert process.stdout is not None
        for line in iter(process.stdout.readline, ""):
            print(line, end="")  # to the terminal with --verbose, else to WORKDIR/kfp-tasks.log (pipelines/console.py)
            if _CONSOLE is not None:
                _CONSOLE.task_line(line)
        print("\n")  # kfp's separator after a task's log
        return process.wait()
    except BaseException:
        # Left in _TASKS for stop_tasks(); its output is drained (unshown) so it cannot block on a full pipe.
        threading.Thread(target=process.communicate, daemon=True).start()
        raise
    finally:
        if process.poll() is not None:
            with _TASKS_LOCK:
                _TASKS.discard(process)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies waiting to be reaped do not count)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        try:
            os.killpg(pgid, 0)
        except OSError:
            return False
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            return True
    return False


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def stop_tasks(grace: float = STOP_GRACE_S) -> int:
    """SIGTERM every running task's process group, wait up to ``grace`` seconds, SIGKILL what is left.

    Returns how many tasks were running. Once called, no new task starts.
    """
    _STOPPING.set()
    with _TASKS_LOCK:
        running = list(_TASKS)
    for process in running:
        _signal_group(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in running:
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(process.pid, signal.SIGKILL)
    for process in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    with _TASKS_LOCK:
        _TASKS.difference_update(running)
    return len(running)


def run_tasks_in_own_process_groups() -> None:
    """Have kfp.local's SubprocessRunner start tasks through :func:`_run_task_subprocess` (kfp is pinned, ==2.17.3)."""
    from kfp.local import subprocess_task_handler

    _STOPPING.clear()
    subprocess_task_handler.run_local_subprocess = _run_task_subprocess


def source_fingerprint(config: RunConfig) -> str | None:
    """Content hash of a local source file, so the data stages' cache follows the file, not its path."""
    path = Path(config.data.source_path)
    return content_hash([path]) if path.is_file() else None


@contextlib.contextmanager
def _task_console(workdir: Path, pipeline, verbose: bool) -> Iterator[None]:
    """Quiet kfp.local's output into WORKDIR/kfp-tasks.log and show one line per task, unless ``verbose``."""
    global _CONSOLE
    if verbose:
        yield
        return
    with TaskConsole(workdir, total=count_tasks(pipeline)) as console:
        _CONSOLE = console
        try:
            yield
        finally:
            _CONSOLE = None


def _run_pipeline(config: RunConfig, workdir: Path, progress: Callable[[str], None], use_cache: bool, verbose: bool = False):
    """Check the inputs, then run every stage through kfp.local; returns the pipeline task."""
    from kfp import local

    from ftloop.pipelines.pipeline import build_pipeline

    # Fail fast, with file and line, before any stage starts. Only the offline generator runs here too:
    # a model or a paid API is called once, by the pipeline's own generate step.
    examples, labels = load_source(config, generate=config.generate.backend == "offline")
    config = ensure_tiny_model(config, workdir, [e.text for e in examples], labels, progress)
    config = resolve_builtin_model(config, progress)
    check_base_model(config)

    support_oneof_artifacts_locally()
    run_tasks_in_own_process_groups()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "kfp"),
        raise_on_error=False,
        enable_caching=use_cache,
    )
    cache_note = "unchanged stages reused from the cache" if use_cache else "no cache"
    progress(f"pipeline: running {config.name} with kfp.local (artifacts under {workdir / 'kfp'}; {cache_note})")
    if not verbose:
        progress(f"task logs: {workdir / TASKS_LOG} (--verbose shows them here)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        warnings.filterwarnings("ignore", message=".*image.*", category=RuntimeWarning)
        pipeline = build_pipeline(config, source_sha256=source_fingerprint(config), use_cache=use_cache)
        with _task_console(workdir, pipeline, verbose):
            return pipeline()


def run_local(
    config: RunConfig, workdir: str | Path, progress: Callable[[str], None] = print, use_cache: bool = True, verbose: bool = False
) -> dict:
    """Validate inputs, run every stage through kfp.local, and write WORKDIR/summary.json last.

    With ``use_cache`` every stage whose inputs, config slice and run parameters are unchanged
    (and, transitively, those of the stages it reads from) is reused from WORKDIR/kfp/.kfp_cache;
    remote generator calls always run, and training and scoring too with ``cluster.cache_training: false``.
    kfp.local's own output goes to WORKDIR/kfp-tasks.log, one line per task to the console
    (pipelines/console.py); ``verbose`` shows kfp's whole stream instead.
    An earlier run's results are first moved to WORKDIR/previous/; SIGTERM (inside
    :func:`sigterm_raises`) or SIGINT stops the running task and raises Terminated / KeyboardInterrupt.
    """
    workdir = Path(workdir).resolve()
    started = time.monotonic()
    prepare_workdir(workdir, progress)
    try:
        task = _run_pipeline(config, workdir, progress, use_cache, verbose)
    except BaseException as exc:
        stopped = stop_tasks()  # SIGINT/SIGTERM (or a bug) in the middle of a task: stop it, don't orphan it
        if isinstance(exc, Terminated):
            what = "no task was running" if not stopped else f"{stopped} running task(s) stopped"
            raise Terminated(f"{what}; no results were written to {workdir}") from None
        raise
    bundle = task.outputs.get("Output")  # empty when a stage failed
    if bundle is None or not Path(bundle.path).exists():
        raise FtloopError("pipeline failed: a stage did not finish (its error is in the log above); no results were written")

    bundle_dir = Path(bundle.path)
    summary = read_summary(bundle_dir).model_copy(
        update={"timings": {"total_seconds": round(time.monotonic() - started, 1)}, "artifacts": str(bundle_dir)}
    )
    try:
        with _writes_to(workdir, "the run's results"):
            for result_dir in RESULT_DIRS:
                if result_dir(bundle_dir).is_dir():
                    shutil.copytree(result_dir(bundle_dir), result_dir(workdir))
            for name in (REPORT_MD, REPORT_HTML):
                shutil.copyfile(bundle_dir / name, workdir / name)
            return write_summary(workdir, summary).to_json()  # written last: its presence means the run finished
    except BaseException:
        _remove_results(workdir)  # no half-copied results
        raise
