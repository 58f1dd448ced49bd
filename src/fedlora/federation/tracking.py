"""Experiment trackers: TensorBoard, MLflow and Weights & Biases beside ``metrics.jsonl``.

``[tracking] backends = ["tensorboard", "mlflow", "wandb"]`` (any subset; none by default)
sends a run to the researcher's own trackers (docs/tracking.md):

* the resolved configuration as parameters (flattened dotted keys);
* every round's metrics at ``step = round`` (`round_metrics`: train loss, bytes up/down,
  drops, clips, epsilon, times, and each evaluated set's metrics with their 95% CI bounds as
  ``seen_clients/loss``, ``seen_clients/loss_ci95_low`` ...), with ``per_client`` each
  client's loss, contribution norm, clip and drop too;
* the final summary (``summary/...``) and, with ``artifacts``, the adapter, the plots and the
  comparison tables as artifacts.

Backends: TensorBoard event files in ``<run dir>/tensorboard`` (PNG plots as images);
MLflow through its client API, by default an embedded SQLite store
``<run dir's parent>/mlflow.db`` with artifacts in ``mlartifacts/`` beside it (no server), or
``mlflow_uri``; W&B in offline mode (files in ``<run dir>/wandb``, ``wandb sync`` uploads
them) unless ``wandb_mode = "online"``. A ``fedlora compare`` is one MLflow parent run with a
child per strategy and seed, and one W&B group (`CompareTracker`).

Resume: the backends' run ids are saved in ``<run dir>/tracking.json`` with the last round
logged; a resumed run reopens the same tracker runs (TensorBoard purges steps after that
round, W&B resumes by id), logs the rounds the tracker missed from the checkpoint's rows and
goes on. A backend that raises (not installed, a full disk, no network) is one logged warning
and is switched off for the rest of the run: a tracker never stops a fedlora run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedlora.federation.config import TrackingConfig
from fedlora.federation.runfiles import TB_DIR, is_run_dir, write_output, wrote
from fedlora.federation.runfiles import TRACKING_STATE as STATE_FILE

LOG = logging.getLogger("fedlora.federation.tracking")
MLFLOW_PARAM_CHUNK = 100  # MLflow's limit of params per log_batch
MLFLOW_METRIC_CHUNK = 1000  # ... and of metrics
MLFLOW_VALUE_MAX = 6000  # longest param value MLflow stores


# -- what is logged -------------------------------------------------------------------------


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    return None


def round_metrics(
    rows: Iterable[Mapping[str, Any]],
    *,
    per_client: bool = False,
    client_losses: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """One round's metrics rows (``kind`` "round" and "eval") as flat tracker metrics.

    Round rows keep their numeric keys (``train_loss``, ``bytes_up``, ``epsilon``, ``time_*``
    ...) and count their per-client tables (``drops``, ``clipped``); eval rows become
    ``<set>/<metric>`` with ``<set>/<metric>_ci95_low`` / ``_high``. ``per_client`` adds
    ``client/<id>/update_norm``, ``/clipped`` (the fraction kept), ``/dropped`` and
    ``/train_loss`` (from `client_losses`). Non-finite values are left out.
    """
    out: dict[str, float] = {}
    for row in rows:
        prefix = f"{row['set']}/" if row.get("kind") == "eval" else ""
        for key, v in row.items():
            if key in ("kind", "round", "set"):
                continue
            if isinstance(v, (list, tuple)) and key.endswith("_ci95") and len(v) == 2:
                for bound, x in zip(("low", "high"), v):
                    if _number(x) is not None:
                        out[f"{prefix}{key}_{bound}"] = float(x)
            elif (x := _number(v)) is not None:
                out[prefix + key] = x
        if row.get("kind") != "round":
            continue
        out["drops"] = float(len(row.get("dropped") or {}))
        out["clipped"] = float(len(row.get("clipped") or {}))
        if per_client:
            for cid, norm in (row.get("update_norms") or {}).items():
                out[f"client/{cid}/update_norm"] = float(norm)
            for cid, kept in (row.get("clipped") or {}).items():
                out[f"client/{cid}/clipped"] = float(kept)
            for cid in row.get("dropped") or {}:
                out[f"client/{cid}/dropped"] = 1.0
            for cid, loss in (client_losses or {}).items():
                if _number(loss) is not None:
                    out[f"client/{cid}/train_loss"] = float(loss)
    return out


def config_params(cfg: Any) -> dict[str, str]:
    """The resolved configuration as flat ``{dotted key: value text}`` parameters."""
    from fedlora.federation.config import _flatten, to_dict

    return {
        k: json.dumps(v) if not isinstance(v, str) else v for k, v in _flatten(to_dict(cfg)).items()
    }


# -- backends -------------------------------------------------------------------------------


@dataclass
class Parent:
    """What the runs of one ``fedlora compare`` share: the MLflow store and parent run, and
    the W&B group."""

    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    group: str | None = None


@dataclass
class OpenRequest:
    """What a backend needs to open (or reopen) its run."""

    run_dir: Path
    name: str
    settings: TrackingConfig
    saved: dict[str, Any]  # this backend's state from tracking.json ({}: a new run)
    last_round: int  # the last round it logged before (0: none)
    parent: Parent
    tags: dict[str, str]
    job_type: str = "train"


class Backend:
    """One tracker. Every method may raise: `RunTracker` turns that into a warning."""

    name = ""

    def open(self, req: OpenRequest) -> dict[str, Any]:
        """Start or resume the run; returns the state to save for resuming it."""
        raise NotImplementedError

    def log_params(self, params: Mapping[str, str]) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def log_artifact(self, path: Path) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        raise NotImplementedError


class TensorBoardBackend(Backend):
    """Event files in ``<run dir>/tensorboard`` (torch's `SummaryWriter`)."""

    name = "tensorboard"

    def open(self, req: OpenRequest) -> dict[str, Any]:

        log_dir = req.run_dir / TB_DIR
        # a resumed run rewrites the rounds after the last one logged: TensorBoard hides the
        # earlier file's events from that step on
        purge = req.last_round + 1 if req.saved else None
        if is_run_dir(req.run_dir):  # its event file joins the run's manifest
            write_output(req.run_dir, TB_DIR, lambda p: self._writer(p, purge))
        else:
            self._writer(log_dir, purge)
        return {"log_dir": str(log_dir)}

    def _writer(self, log_dir: Path, purge: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge)

    def log_params(self, params: Mapping[str, str]) -> None:
        table = "| key | value |\n|---|---|\n" + "\n".join(
            f"| {k} | {str(v).replace('|', '/')} |" for k, v in params.items()
        )
        self.writer.add_text("config", table, 0)
        self.writer.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_artifact(self, path: Path) -> None:
        # TensorBoard has no files: the plots become images, the rest stays in the run dir
        pngs = (
            [path] if path.suffix == ".png" else sorted(path.glob("*.png")) if path.is_dir() else []
        )
        if not pngs:
            return
        import matplotlib.image as mpimg

        for png in pngs:
            self.writer.add_image(f"plots/{png.stem}", mpimg.imread(png), 0, dataformats="HWC")
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


def default_mlflow_uri(where: Path) -> str:
    """The embedded store in folder `where`: ``sqlite:///<where>/mlflow.db``."""
    return f"sqlite:///{where.resolve() / 'mlflow.db'}"


def _mlflow_experiment(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the embedded store, not in the cwd
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


class MlflowBackend(Backend):
    """An MLflow run through `MlflowClient` (no global active run: compare's children and
    their parent are plain run ids)."""

    name = "mlflow"

    def open(self, req: OpenRequest) -> dict[str, Any]:
        from mlflow.tracking import MlflowClient

        uri = (
            req.saved.get("tracking_uri")
            or req.settings.mlflow_uri
            or req.parent.mlflow_uri
            or default_mlflow_uri(req.run_dir.parent)
        )
        self.client = MlflowClient(uri)
        if req.saved.get("run_id"):
            self.run_id = req.saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = dict(req.tags)
            if req.parent.mlflow_run_id:
                tags["mlflow.parentRunId"] = req.parent.mlflow_run_id
            eid = _mlflow_experiment(self.client, req.settings.project, uri)
            self.run_id = self.client.create_run(eid, run_name=req.name, tags=tags).info.run_id
        return {"tracking_uri": uri, "run_id": self.run_id}

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        # MLflow refuses to change a logged value: a resumed run (rounds may grow) keeps them
        have = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:MLFLOW_VALUE_MAX]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), MLFLOW_PARAM_CHUNK):
            self.client.log_batch(self.run_id, params=new[i : i + MLFLOW_PARAM_CHUNK])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_mlflow_key(k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), MLFLOW_METRIC_CHUNK):
            self.client.log_batch(self.run_id, metrics=items[i : i + MLFLOW_METRIC_CHUNK])

    def log_artifact(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _mlflow_key(key: str) -> str:
    # MLflow keys: alphanumerics, _ - . / and spaces
    return re.sub(r"[^\w\-./ ]", "_", key)


class WandbBackend(Backend):
    """A W&B run, offline unless ``tracking.wandb_mode = "online"``; files in
    ``<run dir>/wandb``. The run id is saved, so a resumed run continues it (offline: a second
    offline folder with the same id, which ``wandb sync`` appends to the run)."""

    name = "wandb"

    def open(self, req: OpenRequest) -> dict[str, Any]:
        import wandb

        run_id = req.saved.get("run_id") or uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=req.settings.project,
            entity=req.settings.wandb_entity,
            name=req.name,
            id=run_id,
            resume="allow",
            group=req.parent.group,
            job_type=req.job_type,
            tags=[f"{k}={v}" for k, v in req.tags.items()],
            mode=req.settings.wandb_mode,
            dir=str(req.run_dir),
            reinit="create_new",
            settings=wandb.Settings(silent=True, x_disable_stats=True, console="off"),
        )
        return {"run_id": run_id, "mode": req.settings.wandb_mode, "group": req.parent.group}

    def log_params(self, params: Mapping[str, str]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_artifact(self, path: Path) -> None:
        import wandb

        name = re.sub(r"[^\w\-.]", "_", f"{self.run.id}-{path.stem}")
        kind = "model" if path.name == "adapter" else "result"
        art = wandb.Artifact(name, type=kind)
        if path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        self.run.log_artifact(art)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


BACKEND_CLASSES: dict[str, type[Backend]] = {
    "tensorboard": TensorBoardBackend,
    "mlflow": MlflowBackend,
    "wandb": WandbBackend,
}


# -- one run --------------------------------------------------------------------------------


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        LOG.warning("tracking: %s is unreadable; the trackers start new runs", path)
        return {}


class _Trackers:
    """Backends behind one guard: a call that raises logs one warning and switches that
    backend off, so a tracker never stops the run."""

    def __init__(self, settings: TrackingConfig, log: logging.Logger | None) -> None:
        self.settings = settings
        self.log = log or LOG
        self.backends: list[Backend] = []
        self.state: dict[str, Any] = {"backends": {}, "last_round": 0}

    @property
    def active(self) -> list[str]:
        """The backends still on."""
        return [b.name for b in self.backends]

    def _guard(self, backend: Backend, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a tracker failing must not stop the run
            hint = " (pip install 'fedlora[track]')" if isinstance(e, ImportError) else ""
            self.log.warning(
                "tracking: %s failed to %s (%s: %s)%s; it is off for the rest of this run",
                backend.name,
                what,
                type(e).__name__,
                str(e).strip().splitlines()[0] if str(e).strip() else "",
                hint,
            )
            if backend in self.backends:
                self.backends.remove(backend)
                if what != "close":
                    try:
                        backend.close(True)
                    except Exception:  # noqa: BLE001, S110 - it is already being switched off
                        pass
            return None

    def _open(self, req: OpenRequest, saved: Mapping[str, Any]) -> None:
        for name in self.settings.backends:
            backend = BACKEND_CLASSES[name]()
            self.backends.append(backend)
            req.saved = dict(saved.get(name) or {})
            got = self._guard(backend, "open", backend.open, req)
            if got is not None:
                self.state["backends"][name] = got

    def each(self, what: str, method: str, *args: Any) -> None:
        for b in list(self.backends):
            self._guard(b, what, getattr(b, method), *args)

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        """Upload each existing file or folder (nothing with ``artifacts = false``)."""
        if not self.settings.artifacts:
            return
        for p in map(Path, paths):
            if p.exists():
                self.each(f"log artifact {p.name}", "log_artifact", p)

    def close(self, *, failed: bool = False) -> None:
        """End every tracker run (``failed``: marked as failed where the tracker can)."""
        self.each("close", "close", failed)
        self.backends = []


class RunTracker(_Trackers):
    """The trackers of one run directory (see the module docstring). `start` opens them (or
    reopens the runs saved in ``tracking.json``); the engine calls `log_round` after each
    round's checkpoint."""

    def __init__(
        self,
        settings: TrackingConfig,
        run_dir: str | Path,
        *,
        name: str = "fedlora",
        parent: Parent | None = None,
        tags: Mapping[str, str] | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        super().__init__(settings, log)
        self.run_dir = Path(run_dir)
        self.name = name
        self.parent = parent or Parent()
        self.tags = dict(tags or {})
        self.started = False
        self._client_losses: dict[int, dict[str, float]] = {}

    @classmethod
    def for_config(cls, cfg: Any, parent: Parent | None = None, log=None) -> RunTracker:
        """The trackers ``cfg.tracking`` asks for, on ``cfg.output_dir``."""
        tags = {"strategy": cfg.strategy.name, "seed": str(cfg.seed), "model": cfg.model.name}
        return cls(cfg.tracking, cfg.output_dir, name=cfg.name, parent=parent, tags=tags, log=log)

    def start(self, cfg: Any, rows: Sequence[Mapping[str, Any]], *, resumed: bool) -> None:
        """Open the trackers, log the configuration and any checkpointed rounds they missed.

        ``resumed``: the run continues from a checkpoint, so the runs in ``tracking.json`` are
        reopened; otherwise new tracker runs start. Calling it again does nothing."""
        if self.started or not self.settings.backends:
            self.started = True
            return
        self.started = True
        path = self.run_dir / STATE_FILE
        saved = _read_state(path) if resumed else {}
        last = int(saved.get("last_round", 0)) if saved else 0
        req = OpenRequest(self.run_dir, self.name, self.settings, {}, last, self.parent, self.tags)
        self._open(req, saved.get("backends") or {})
        self.state["last_round"] = last
        self.each("log the config", "log_params", config_params(cfg))
        missed = sorted({int(r["round"]) for r in rows if int(r["round"]) > last})
        for rnd in missed:  # logged after the checkpoint: a crash in between missed them
            self.log_round(rnd, [r for r in rows if int(r["round"]) == rnd])
        self._save()

    def _save(self) -> None:
        if not self.state["backends"]:
            return
        from fedlora.federation.checkpoint import atomic_write_text
        try:
            atomic_write_text(self.run_dir / STATE_FILE, json.dumps(self.state, indent=1) + "\n")
            if is_run_dir(self.run_dir):
                wrote(self.run_dir, self.run_dir / STATE_FILE)
        except OSError as e:
            self.log.warning("tracking: cannot write %s (%s)", self.run_dir / STATE_FILE, e)

    def wrap_on_update(self, on_update: Callable | None) -> Callable | None:
        """`on_update` for the engine that also keeps each client's train loss (``per_client``)."""
        if not (self.settings.per_client and self.backends):
            return on_update

        def hook(rnd: int, spec: Any, update: Any) -> Any:
            loss = update.extras.get("train_loss")
            if loss is not None:
                self._client_losses.setdefault(rnd, {})[spec.client_id] = float(loss)
            return on_update(rnd, spec, update) if on_update is not None else None

        return hook

    def log_round(self, rnd: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Log round `rnd`'s rows (its round row and eval rows) at step `rnd`."""
        if not self.backends:
            return
        metrics = round_metrics(
            rows,
            per_client=self.settings.per_client,
            client_losses=self._client_losses.pop(rnd, None),
        )
        self.each(f"log round {rnd}", "log_metrics", metrics, rnd)
        self.state["last_round"] = max(int(self.state["last_round"]), rnd)
        self._save()

    def log_summary(self, summary: Mapping[str, Any], step: int) -> None:
        """The run's ``summary.json`` numbers as ``summary/...`` metrics at `step`."""
        flat = {
            f"summary/{k}": x
            for k, v in summary.items()
            if k not in ("rounds",) and (x := _number(v)) is not None
        }
        if flat:
            self.each("log the summary", "log_metrics", flat, step)


# -- a comparison ---------------------------------------------------------------------------


class CompareTracker(_Trackers):
    """What the runs of one ``fedlora compare`` share (`parent`): an MLflow parent run (its
    children are the runs, one per strategy and seed) in one store under the comparison's
    folder, and a W&B group. `log_artifacts` uploads the comparison's tables to the parent
    run (W&B: a run of job type "compare" in the group)."""

    def __init__(
        self,
        settings: TrackingConfig,
        out_dir: str | Path,
        name: str,
        *,
        resume: bool = False,
        log: logging.Logger | None = None,
    ) -> None:
        super().__init__(settings, log)
        self.out_dir = Path(out_dir)
        self.name = name
        path = self.out_dir / STATE_FILE
        saved = _read_state(path) if resume else {}
        self.saved_backends = dict(saved.get("backends") or {})
        group = saved.get("group") or f"{name}-{uuid.uuid4().hex[:8]}"
        self.parent = Parent(group=group if "wandb" in settings.backends else None)
        self.state["group"] = group
        if "mlflow" in settings.backends:
            self._open_mlflow_parent(path)

    def _open_mlflow_parent(self, path: Path) -> None:
        backend = MlflowBackend()
        self.backends.append(backend)
        uri = self.settings.mlflow_uri or default_mlflow_uri(self.out_dir)
        settings = replace(self.settings, mlflow_uri=uri)
        req = OpenRequest(
            self.out_dir, self.name, settings, dict(self.saved_backends.get("mlflow") or {}), 0,
            Parent(), {"fedlora": "compare"},
        )  # fmt: skip
        self.out_dir.mkdir(parents=True, exist_ok=True)
        got = self._guard(backend, "open the compare run", backend.open, req)
        if got is not None:
            self.state["backends"]["mlflow"] = got
            self.parent.mlflow_uri, self.parent.mlflow_run_id = got["tracking_uri"], got["run_id"]
            from fedlora.federation.checkpoint import atomic_write_text

            atomic_write_text(path, json.dumps(self.state, indent=1) + "\n")

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        """The comparison's files to the MLflow parent run and a W&B "compare" run."""
        paths = [Path(p) for p in paths]
        super().log_artifacts(paths)
        if "wandb" in self.settings.backends and self.settings.artifacts:
            w = _Trackers(replace(self.settings, backends=["wandb"]), self.log)
            req = OpenRequest(
                self.out_dir, f"{self.name}-compare", w.settings, {}, 0, self.parent,
                {"fedlora": "compare"}, job_type="compare",
            )  # fmt: skip
            w._open(req, {})
            w.log_artifacts(paths)
            w.close()
