"""Files a browser sends to ``textseg web``: a volume file or a zipped DICOM series, read as
:func:`TextSegLib.io.volumes.read_volume` reads files."""

from __future__ import annotations

import tempfile
import zipfile
import zlib
from pathlib import Path

from TextSegLib.core.errors import OutputError
from TextSegLib.core.messages import first_line
from TextSegLib.io.volumes import Volume, VolumeError, read_volume

__all__ = [
    "read_upload",
]

UPLOAD_KINDS = "NRRD, NIfTI, MHA/MHD or a zipped DICOM series (.zip)"


def _dicom_folder(root: Path) -> Path:
    """The folder of an unpacked zip that holds the most files (where its DICOM series is)."""
    folders: dict[Path, int] = {}
    for path in root.rglob("*"):
        if path.is_file():
            folders[path.parent] = folders.get(path.parent, 0) + 1
    if not folders:
        raise VolumeError("The zip file is empty; zip the folder of one DICOM series.")
    return max(folders, key=lambda folder: (folders[folder], -len(folder.parts)))


def read_upload(name: str, content: bytes) -> Volume:
    """Read an uploaded file (its browser file name and bytes) as :func:`~TextSegLib.io.volumes.read_volume` reads
    files; a ``.zip`` holds a DICOM series. Raises :class:`~TextSegLib.io.volumes.VolumeError` with one line for the
    user, or :class:`~TextSegLib.core.errors.OutputError` when the server cannot store the upload; the temporary
    copy is always removed."""
    base = Path(name).name or "upload"
    with tempfile.TemporaryDirectory(prefix="textseg-upload-") as folder:
        path = Path(folder) / base
        try:
            path.write_bytes(content)
        except OSError as error:
            raise OutputError(f"The upload {base!r} cannot be stored on the server ({error.strerror or error}); "
                              "free disk space there or upload a smaller file.") from None
        if base.lower().endswith(".zip"):
            unpacked = Path(folder) / "unpacked"
            try:
                with zipfile.ZipFile(path) as archive:
                    for member in archive.infolist():  # names that would land outside the folder are refused
                        target = (unpacked / member.filename).resolve()
                        if not target.is_relative_to(unpacked.resolve()):
                            raise VolumeError(f"The zip file {base!r} holds the path {member.filename!r} outside "
                                              "its folder; zip the DICOM folder itself.")
                    archive.extractall(unpacked)
            except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as error:
                # damaged, cut short, compressed in a way Python cannot unpack
                raise VolumeError(f"{base!r} is not a readable zip file ({first_line(error)}); upload "
                                  f"{UPLOAD_KINDS}.") from None
            except RuntimeError as error:
                if "encrypted" not in str(error):
                    raise
                raise VolumeError(f"{base!r} is encrypted; zip the DICOM folder without a password.") from None
            except OSError as error:
                raise OutputError(f"The zip file {base!r} cannot be unpacked on the server ({error.strerror or error});"
                                  " free disk space there or upload a smaller file.") from None
            path = _dicom_folder(unpacked)
        try:
            volume = read_volume(path)
        except VolumeError as error:  # the library's message, naming the upload instead of its temporary copy
            text = first_line(error).replace(str(path), base).replace(str(Path(folder) / "unpacked"), base)
            raise VolumeError(text) from None
        volume.source = base
        return volume
