"""Staged writes: a model is written for its destination into a temporary folder, verified
there, and only then committed (`StagedModel`).

For a regular file the folder lies beside the destination (a link's final target) and commit
renames: data file(s) first, model last, each fsynced before the renames, so a crash (power loss
included) leaves the destination either old or new. Copy-then-append of data files (see
`bnfold.external`) also means that after an in-place save the old model file still reads correct
bytes from the new data file (its tensors are a prefix of it), so even a crash between the two
renames leaves a loadable model. A device, FIFO or stdout is staged in the system's temporary
folder and streamed into on commit (`bnfold.destination`); what each kind promises is there.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import stat
import tempfile

import onnx

from bnfold import destination, external, wire
from bnfold.destination import Destination
from bnfold.errors import UsageError, WriteFailed
from bnfold.loading import PROTOBUF_LIMIT, LoadedModel, Spill
from bnfold.tensors import byte_size, initializers, is_external, iter_tensors

# Above this the model is saved with external data; the margin covers what ByteSize() does not
# foresee (it is exact, but a caller may add a little before saving).
MAX_EMBEDDED = PROTOBUF_LIMIT - 2**26


class StagedModel:
    """A written output not yet in place: verify `path` (onnxruntime can open it), then commit.

    As a context manager it discards on exit unless committed.
    """

    def __init__(self, target: Destination, tmp_dir: pathlib.Path, in_place: bool = False):
        self.destination = target
        self.dst = target.path  # the file replaced (a link's target); `-` for stdout
        self.label = target.label  # how messages name it
        self.tmp_dir = tmp_dir
        self.path = tmp_dir / ("model.onnx" if target.kind == destination.STDOUT else target.path.name)
        self.in_place = in_place  # dst is the source model
        self.data_files: list[str] = []  # names inside tmp_dir, moved next to dst on commit
        self.extended: set[str] = set()  # data files that are a source data file plus appended bytes
        self.copies: external.DataCopies | None = None  # big data files being copied in the background
        self.committed = False

    def commit(self) -> pathlib.Path:
        """Put the staged model where it goes: renamed into place, or streamed (see
        bnfold.destination). Returns the path written (`-` for stdout)."""
        if self.committed:
            return self.dst
        if self.copies is not None:  # done by stage_model already; a commit never races a copy
            with _discarding_on_error(self):
                self.copies.finish()
        if self.destination.streamed:
            self._stream()
        else:
            self._rename()
        return self.dst

    def _stream(self) -> None:
        try:
            if self.data_files:  # stage_model refuses this first; a guard for callers that do not
                destination.refuse_external_data(self.destination)
            destination.stream(self.destination, self.path)
        except OSError as e:
            raise WriteFailed(f"cannot write {self.label}: {e.strerror or e}") from None
        finally:
            self.discard()
        self.committed = True

    def _rename(self) -> None:
        """Data first, model last: until the model rename the old model is what dst holds.

        An old model at dst that is not the source may read a data file about to be replaced
        with unrelated bytes; it is removed first, so a crash in between leaves no model rather
        than an old model reading new data. (The source, in place, only reads data files that
        are replaced by themselves plus appended bytes.)
        """
        created: list[pathlib.Path] = []  # data files that did not exist before: taken back on failure
        try:
            if self._clobbers_old_data():
                os.unlink(self.dst)
            for name in self.data_files:
                target = self.dst.parent / name
                if not target.exists():
                    created.append(target)
                os.replace(self.tmp_dir / name, target)
            if self.data_files:  # the data renames must be durable before the model's
                _sync_dir(self.dst.parent)
            os.replace(self.path, self.dst)
        except OSError as e:
            for target in created:
                with contextlib.suppress(OSError):
                    target.unlink()
            self.discard()
            raise WriteFailed(f"cannot write {self.label}: {e.strerror or e}") from None
        self.committed = True
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        try:
            _sync_dir(self.dst.parent)
        except OSError as e:
            raise WriteFailed(f"{self.label} was written but could not be synced to disk: {e.strerror or e}") from None

    def _clobbers_old_data(self) -> bool:
        if self.in_place or not self.dst.exists():
            return False
        return any(n not in self.extended and (self.dst.parent / n).exists() for n in self.data_files)

    def discard(self) -> None:
        if self.committed:
            return
        try:
            if self.copies is not None:
                self.copies.cancel()
        finally:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def save_model(
    model: onnx.ModelProto, dst, *, source: LoadedModel | None = None, size_threshold: int = 1024
) -> pathlib.Path:
    """Write `model` to `dst` atomically (see `stage_model`)."""
    return stage_model(model, dst, source=source, size_threshold=size_threshold).commit()


def stage_model(
    model: onnx.ModelProto,
    dst,
    *,
    source: LoadedModel | None = None,
    size_threshold: int = 1024,
    into: StagedModel | None = None,
) -> StagedModel:
    """Write `model` for `dst` into a temporary folder beside it; `model` is left as it was.

    With external data in `source` (or a model too big to embed), tensors in memory of at
    least `size_threshold` bytes go to the data file; smaller ones stay embedded. `into`: the
    `begin_staging` of `dst` whose data file copies are under way.
    """
    staged = into if into is not None else _new_staged(dst, source)
    if staged.destination.given != destination.classify(dst).given:
        raise ValueError(f"staged for {staged.destination.given}, not {dst}")
    with _discarding_on_error(staged):
        _write_staged(model, staged, source, size_threshold)
    return staged


def begin_staging(dst, source: LoadedModel) -> StagedModel:
    """Stage `dst` now, before the model is folded: the copies of the source's big data files
    start at once in the background (`external.DataCopies`), so they run while the fold does. Pass it to
    `stage_model(into=)`; as a context manager it stops the copies and removes everything
    unless committed."""
    staged = _new_staged(dst, source)
    with _discarding_on_error(staged):
        renames = external.plan_data_names(staged.dst, list(source.external_files), source.base_dir)
        _start_copies(staged, {name: source.base_dir / location for location, name in renames.items()})
    return staged


def _new_staged(dst, source: LoadedModel | None) -> StagedModel:
    target = _check_destination(dst, source)
    folder = None if target.streamed else target.path.parent  # None: the system's temporary folder
    try:
        tmp_dir = tempfile.mkdtemp(prefix=f".{target.path.name}.", suffix=".bnfold", dir=folder)
    except OSError as e:
        raise WriteFailed(f"cannot write {target.label}: {e.strerror or e}") from None
    in_place = source is not None and not target.streamed and target.path.resolve() == source.path
    return StagedModel(target, pathlib.Path(tmp_dir), in_place)


@contextlib.contextmanager
def _discarding_on_error(staged: StagedModel):
    """Any failure removes what was staged; an OSError becomes one WriteFailed line."""
    try:
        yield
    except OSError as e:
        staged.discard()
        raise WriteFailed(f"cannot write {staged.label}: {e.strerror or e}") from None
    except BaseException:
        staged.discard()
        raise


def _check_destination(dst, source: LoadedModel | None) -> Destination:
    target = destination.classify(dst)
    if target.streamed:
        if source is not None and source.external_files:
            destination.refuse_external_data(target)
    elif source is not None and target.path.resolve() in _source_data_files(source):
        raise UsageError(f"output {target.label} is an external data file of the input model; choose another output")
    return target


def _source_data_files(source: LoadedModel) -> set[pathlib.Path]:
    return {(source.base_dir / location).resolve() for location in source.external_files}


def _check_data_targets(staged: StagedModel, source: LoadedModel | None, renames: dict[str, str], names) -> None:
    """A data file written for dst may replace a source file only with that file's own copy
    plus appended bytes (see `external.plan_data_names`); never the input model or another data file."""
    if source is None:
        return
    inputs = _source_data_files(source) | {source.path}
    copies_of = {name: (source.base_dir / location).resolve() for location, name in renames.items()}
    for name in names:
        target = (staged.dst.parent / name).resolve()
        if target in inputs and copies_of.get(name) != target:
            raise UsageError(
                f"output {staged.label} would write its data file '{name}' over the input's {target}; "
                "choose another output name"
            )


def _write_staged(model, staged: StagedModel, source: LoadedModel | None, size_threshold: int) -> None:
    splice = None
    if source is not None and source.stubs:
        spilled = source.spill.stubs if source.spill is not None else {}
        splice = wire.plan_splice(model, {**source.stubs, **spilled})
    if splice is not None and splice[1] <= MAX_EMBEDDED:
        _check_no_stale_stub(splice[0], source)
        _write_spliced(splice[0], staged, source)
    else:  # stubs of a model grown too big to embed stay external refs: the model file is their data
        _write_whole(model, staged, source, size_threshold)
    if not staged.destination.streamed and staged.dst.exists():
        _keep_mode_and_owner(staged.dst, staged.path)
    _sync_dir(staged.tmp_dir)


def _keep_mode_and_owner(old: pathlib.Path, new: pathlib.Path) -> None:
    """An overwrite keeps the file's permissions, and its owner where we may set it (root may;
    others keep their own ownership, as editors that replace a file do)."""
    info = old.stat()
    if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
        with contextlib.suppress(PermissionError):
            os.chown(new, info.st_uid, info.st_gid)  # before chmod: a chown may clear set-id bits
    os.chmod(new, stat.S_IMODE(info.st_mode))


def _check_no_stale_stub(pieces: list, source: LoadedModel) -> None:
    """A stub edited after loading matches no record: written as it is, it would point into the
    input (or the spill file) from the output. Refuse; nothing in bnfold edits a tensor in place."""
    stale = {source.stub_location, Spill.LOCATION}
    for piece in pieces:
        if isinstance(piece, onnx.TensorProto) and is_external(piece):
            if external.external_ref(piece, "model").location in stale:
                raise ValueError(f"initializer '{piece.name}' was edited in place after a lazy load")


def _write_spliced(pieces: list, staged: StagedModel, source: LoadedModel) -> None:
    """Embedded output of a lazy load: unchanged big tensors copied from the source file."""
    with open(source.path, "rb") as src:
        info = os.fstat(src.fileno())
        if (info.st_size, info.st_mtime_ns) != source.file_stamp:
            raise WriteFailed(f"cannot write {staged.label}: the input {source.path} changed since it was read")
        fd = os.open(staged.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            wire.write_splice(fd, pieces, src.fileno(), source.spill.fileno() if source.spill else None)
            os.fsync(fd)
        finally:
            os.close(fd)


def _unspill(model: onnx.ModelProto, source: LoadedModel | None) -> None:
    """Put spilled tensors' bytes back into `model` (a model too big to embed after all)."""
    spill = source.spill if source is not None else None
    if spill is None or not spill.stubs:
        return
    for tensor in initializers(model.graph):
        found = spill.find(tensor)
        if found is not None:
            tensor.raw_data = os.pread(spill.fileno(), found.data_length, found.data_offset)
            del tensor.external_data[:]
            tensor.ClearField("data_location")


def _write_whole(model, staged: StagedModel, source: LoadedModel | None, size_threshold: int) -> None:
    spill = source.spill if source is not None else None
    locations = (external.external_ref(t, "model").location for t in iter_tensors(model) if is_external(t))
    referenced = list(dict.fromkeys(location for location in locations if location != Spill.LOCATION))
    if referenced and source is None:
        raise ValueError("model references external data: pass the LoadedModel it came from as source=")
    keeps_external = bool(referenced) or bool(source and source.external_files)
    data = None
    if not keeps_external:  # embedded: the spilled tensors' bytes go back into the model
        _unspill(model, source)
        data = _serialized_embedded(model)
    if data is not None:
        _write_file(staged.path, data)
    else:
        _check_external_output(staged.destination)
        renames = external.plan_data_names(staged.dst, referenced, source.base_dir if source else None)
        append_to = next(iter(renames.values()), f"{staged.dst.name}.data")
        _check_data_targets(staged, source, renames, [*renames.values(), append_to])
        compact = _mostly_dead(model, source, renames, staged)
        _copy_data_files(staged, source, {location: name for location, name in renames.items() if location not in compact})
        staged.data_files.extend(renames[location] for location in compact)
        with external.externalized(model, staged.tmp_dir, staged.data_files, append_to, renames, size_threshold, spill, compact) as records:
            pieces, size = wire.plan_splice(model, {}, records)
            if size >= PROTOBUF_LIMIT:
                raise WriteFailed(f"cannot write {staged.label}: over 2 GiB even with weights in external data")
            _write_pieces(staged.path, pieces)
        if staged.copies is not None:  # everything else is written: now wait for the big copies
            staged.copies.finish()
        for name in staged.data_files:  # once, at the end: the copies' write-back ran meanwhile
            _sync_path(staged.tmp_dir / name)


COMPACT_BELOW = 0.5  # a data file the output reads less than this share of is rewritten, not copied


def _mostly_dead(model, source: LoadedModel, renames: dict[str, str], staged: StagedModel) -> dict[str, pathlib.Path]:
    """The source data files (location -> path) the folded model reads less than COMPACT_BELOW
    of: when a fold replaced most of their tensors, copying them whole would keep the old bytes
    as dead space (the output twice the size) and sync them for nothing. Those get a fresh file
    holding only the tensors still read. Not a file the output replaces in place."""
    live: dict[str, float] = {}
    for tensor in iter_tensors(model):
        if is_external(tensor):
            ref = external.external_ref(tensor, "model")
            size = ref.length if ref.length is not None else byte_size(tensor)
            live[ref.location] = live.get(ref.location, 0) + (size if size is not None else float("inf"))
    found = {}
    for location, name in renames.items():
        path = source.base_dir / location
        if (staged.dst.parent / name).resolve() != path.resolve() and live.get(location, 0) < COMPACT_BELOW * path.stat().st_size:
            found[location] = path
    return found


def _check_external_output(target: Destination) -> None:
    """Data files go beside the model file; a loader looks for them beside the path it was given.
    Through a link into another folder the two differ, and the model would not load."""
    if target.streamed:
        destination.refuse_external_data(target)
    if target.path.parent.resolve() != target.given.parent.resolve():
        raise UsageError(
            f"output {target.given} links to {target.path} in another folder, and the model keeps weights "
            "in external data (found beside the path it is loaded from); write to the target itself"
        )


def _serialized_embedded(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, None when too big to embed. Serialized once: in upb ByteSize() itself
    serializes, so asking first would build the whole model's bytes twice."""
    try:
        data = model.SerializeToString()
    except ValueError:  # over protobuf's limit
        return None
    return data if len(data) <= MAX_EMBEDDED else None


def _copy_data_files(staged: StagedModel, source: LoadedModel | None, renames: dict[str, str]) -> None:
    """Copy each referenced source data file under its output name; unchanged bytes stay put.
    Big files are copied in the background (and may be already, see `begin_staging`)."""
    jobs = {name: source.base_dir / location for location, name in renames.items()}
    _start_copies(staged, jobs)
    for name, path in jobs.items():
        if staged.copies is None or name not in staged.copies.jobs:
            shutil.copyfile(path, staged.tmp_dir / name)  # synced with the rest, last
        staged.data_files.append(name)
        if (staged.dst.parent / name).resolve() == path.resolve():
            staged.extended.add(name)


def _start_copies(staged: StagedModel, jobs: dict[str, pathlib.Path]) -> None:
    """Copy the big files of `jobs` (output name -> source file) in the background, keeping
    the copies under way if they are these (the fold may have dropped a file's last tensor)."""
    big = {name: path for name, path in jobs.items() if path.stat().st_size >= external.BACKGROUND_COPY_MIN}
    early = staged.copies
    if early is not None and early.jobs == big:
        return
    if early is not None:
        staged.copies = None
        early.cancel()
        for name in early.jobs:
            (staged.tmp_dir / name).unlink(missing_ok=True)
    if big:
        staged.copies = external.DataCopies(big, staged.tmp_dir)


# --------------------------------------------------------------------------- durability


def _write_file(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        _sync_file(f)


def _write_pieces(path: pathlib.Path, pieces: list) -> None:
    """A `wire.plan_splice` plan without stubs: bytes, and tensors serialized one at a time."""
    with open(path, "wb") as f:
        for piece in pieces:
            if not isinstance(piece, bytes):
                body = piece.SerializeToString()
                piece = wire.record(wire.INITIALIZER, len(body)) + body
            f.write(piece)
        _sync_file(f)


def _sync_file(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sync_path(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(path: pathlib.Path) -> None:
    """A rename is durable only once its folder is synced."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
