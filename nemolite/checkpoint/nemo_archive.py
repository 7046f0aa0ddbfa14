"""The files of a NeMo checkpoint: a ``.nemo`` tar (read in place), a gzipped one, or a directory.

An uncompressed tar is never extracted: each member is a ``FileWindow`` onto the tar file
itself. Gzipped tars (NeMo < 1.7) cannot be read in place and are extracted to a temporary
directory with ``filter="data"``; so are distributed-checkpoint folders inside a tar, whose
readers need a directory. Members with absolute or ``..`` paths, links, devices or fifos make the
archive refused, and so does a gzipped one whose members need more disk than is free.
Names are looked up inside the checkpoint only: in a directory, a path that leaves it (``..``,
absolute, or a symlink out) is treated as absent.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from nemolite.checkpoint.torch_zip import FileWindow
from nemolite.errors import NemoliteError


class NemoArchive:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._temp: tempfile.TemporaryDirectory | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self._tar: tarfile.TarFile | None = None
        if self.path.is_dir():
            self.root: Path | None = self.path
        elif self.path.is_file():
            self.root = None
            self._open_tar()
        else:
            raise NemoliteError(f"NeMo checkpoint {self.path} does not exist")

    def _open_tar(self) -> None:
        with open(self.path, "rb") as file:
            gzipped = file.read(2) == b"\x1f\x8b"
        try:
            tar = tarfile.open(self.path, "r:gz" if gzipped else "r:")
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError, UnicodeError, zlib.error) as error:
            raise NemoliteError(f"{self.path} is not a readable .nemo archive ({'gzipped ' if gzipped else ''}tar: "
                                f"{error}); it may be truncated, copy or download it again") from None
        if gzipped:
            self._check_paths(members)
            claimed, free = sum(member.size for member in members), shutil.disk_usage(self.temp_dir()).free
            if claimed > free:
                raise NemoliteError(f"{self.path}: extracting this gzipped archive needs {claimed / 2**30:.1f} GiB, "
                                    f"but only {free / 2**30:.1f} GiB are free in {self.temp_dir()}")
            self.root = Path(self.temp_dir()) / "nemo"
            _extract(tar, members, self.root)
            tar.close()
            return
        self._check_paths(members)
        self._tar = tar
        size = self.path.stat().st_size
        for member in members:
            if member.isfile():
                if member.offset_data + member.size > size:
                    raise NemoliteError(f"{self.path} is truncated: member {member.name} ends past the end of the "
                                        "file; copy or download it again")
                self._members[posixpath.normpath(member.name)] = member

    def _check_paths(self, members: list[tarfile.TarInfo]) -> None:
        for member in members:
            name = member.name
            if name.startswith(("/", "\\")) or ".." in Path(name.replace("\\", "/")).parts:
                raise NemoliteError(f"{self.path} holds a member with an unsafe path {name!r}; refusing to read "
                                    "this archive")
            if not (member.isfile() or member.isdir()):  # NeMo writes files and folders only
                kind = "link" if member.issym() or member.islnk() else "device or fifo"
                target = f" -> {member.linkname!r}" if member.linkname else ""
                raise NemoliteError(f"{self.path} holds a {kind} {name!r}{target}; refusing to read this archive")

    def temp_dir(self) -> str:
        if self._temp is None:
            self._temp = tempfile.TemporaryDirectory(prefix="nemolite-nemo-")
        return self._temp.name

    def names(self) -> list[str]:
        """Relative paths of every regular file (``a/b``, no leading ``./``)."""
        if self.root is not None:
            return sorted(str(path.relative_to(self.root).as_posix()) for path in self.root.rglob("*")
                          if path.is_file())
        return sorted(self._members)

    def _inside(self, name: str) -> Path | None:
        """``root / name`` when it stays inside the checkpoint, symlinks resolved; else None."""
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return None
        path = self.root / name
        root = self.root.resolve()
        return path if path.resolve() == root or root in path.resolve().parents else None

    def exists(self, name: str) -> bool:
        if self.root is not None:
            path = self._inside(name)
            return path is not None and path.is_file()
        return posixpath.normpath(name) in self._members

    def window(self, name: str) -> FileWindow:
        if self.root is not None:
            path = self._inside(name)
            if path is None:
                raise NemoliteError(f"{name!r} is not inside the checkpoint {self.path}; refusing to read it")
            return FileWindow(path)
        member = self._members[posixpath.normpath(name)]
        return FileWindow(self.path, member.offset_data, member.size)

    def read_bytes(self, name: str) -> bytes:
        with self.window(name) as window:
            return window.read()

    def directory(self, prefix: str) -> Path:
        """A real directory holding the member folder ``prefix`` (extracted from a tar if needed)."""
        if self.root is not None:
            path = self._inside(prefix)
            if path is None:
                raise NemoliteError(f"{prefix!r} leaves the checkpoint {self.path}; refusing to read it")
            return path
        destination = Path(self.temp_dir()) / "extracted"
        members = [member for name, member in self._members.items() if name.startswith(prefix + "/")]
        _extract(self._tar, members, destination)
        return destination / prefix

    def copy_out(self, name: str, destination: Path) -> Path:
        with self.window(name) as source, open(destination, "wb") as target:
            shutil.copyfileobj(source, target)
        return destination

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        if self._temp is not None:
            self._temp.cleanup()
            self._temp = None


def _extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo], destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    try:
        tar.extractall(destination, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise NemoliteError(f"cannot extract {getattr(tar, 'name', 'archive')}: {error}; it may be truncated or "
                            "unsafe") from None
    if not os.listdir(destination):
        raise NemoliteError(f"{getattr(tar, 'name', 'archive')} is empty")
