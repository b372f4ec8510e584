"""The ingest file index: path -> (size, mtime, SHA-256, parsed header or error), so a re-run
skips every file whose size and mtime are unchanged (as git's index does), and the pseudonyms and
keyed UIDs that stand in for patient identifiers everywhere ingest stores state.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from medgen.errors import InputError, InternalError, UnreadableFileError, error_class
from medgen.io.atomic import write_text_atomic
from medgen.io.dicom.header import DicomHeader, read_header
from medgen.io.nifti import is_nifti
from medgen.io.pseudonyms import digest as _digest
from medgen.io.pseudonyms import subject_id as _subject_id


class FileIndex:
    """path -> (size, mtime_ns, sha256, parsed header or error). Lets a re-run skip unchanged files.

    Patient identifiers never reach the index file: a header's identifiers are replaced by the
    subject pseudonym, its Series and SOP Instance UIDs by keyed hashes (HMAC with the salt), before
    it is stored, and the index is tied to the salt that made them. Grouping needs only equality of
    UIDs, which the keyed hashes keep.
    """

    def __init__(self, path: Path, salt: str):
        self.path = path
        self.salt = salt
        self.check = _digest(salt, "file-index")
        self.entries: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                stored = json.loads(path.read_text())
                if stored.get("salt_check") == self.check:
                    self.entries = stored["entries"]
            except (OSError, ValueError, KeyError, AttributeError):
                self.entries = {}  # a damaged index (or another salt's) only costs a full re-read
        self.used: dict[str, dict[str, Any]] = {}
        self.files_read = 0
        self.bytes_read = 0

    def fresh(self, p: Path) -> dict[str, Any] | None:
        """The entry for `p` when its size and mtime are unchanged (the file need not be read)."""
        try:
            st = p.stat()
        except OSError:
            return None
        e = self.entries.get(str(p))
        if e and e["size"] == st.st_size and e["mtime_ns"] == st.st_mtime_ns:
            self.used[str(p)] = e
            return e
        return None

    def add(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Record a `survey_file` result."""
        entry = dict(entry)
        path = entry.pop("path")
        if entry.get("header"):
            ids = entry["header"]["identifiers"]
            entry["header"] = {
                **entry["header"],
                "identifiers": {"pseudonym": dicom_subject_id(self.salt, ids)},
                "series_uid": keyed_uid(self.salt, entry["header"]["series_uid"]),
                "sop_instance": keyed_uid(self.salt, entry["header"]["sop_instance"]),
            }
        self.files_read += 1
        self.bytes_read += entry.pop("nbytes")
        self.entries[path] = self.used[path] = entry
        return entry

    def _entry(self, p: Path) -> dict[str, Any] | None:
        e = self.fresh(p)
        if e is None and p.exists():
            e = self.add(survey_file(str(p), parse_dicom=not is_nifti(p)))
        return e

    def dicom_header(self, p: Path) -> DicomHeader | None:
        """Header from the index when the file is unchanged, else read + hash + parse in one read."""
        e = self._entry(p)
        if e is None:
            raise UnreadableFileError(p, "cannot open: no such file (broken link?)")
        if e.get("error"):
            raise error_class(e["error"]["code"])(p, e["error"]["reason"])
        return DicomHeader.from_json(e["header"]) if e.get("header") else None

    def sha256(self, p: Path) -> str:
        """Content hash; '' when the file cannot be read (its row says why)."""
        e = self._entry(p)
        return e["sha256"] if e else ""

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps({"salt_check": self.check, "entries": self.used}, sort_keys=True))


def survey_file(path: str, parse_dicom: bool) -> dict[str, Any]:
    """Read a file once: its stat, SHA-256 and (for DICOM) parsed header or typed error.

    Module-level and JSON-valued so worker processes can run it and the index can keep it.
    """
    p = Path(path)
    entry: dict[str, Any] = {"path": path, "header": None, "error": None}
    try:
        st = p.stat()  # before reading: a write during the read changes mtime, so the next run re-reads
        data = p.read_bytes()
    except OSError as e:
        err = UnreadableFileError(p, f"cannot read: {e.strerror or e}")
        return {
            **entry,
            "size": -1,
            "mtime_ns": -1,
            "sha256": "",
            "nbytes": 0,
            "error": {"code": err.code, "reason": err.reason},
        }
    entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data))
    if parse_dicom:
        try:
            h = read_header(p, data)
            entry["header"] = h.to_json() if h else None
        except InputError as err:
            entry["error"] = {"code": err.code, "reason": err.reason}
        except Exception as e:  # a parser bug on one hostile file is that file's row, never the batch's end
            entry["error"] = {"code": InternalError.code, "reason": f"{type(e).__name__}: {e}"}
    return entry


def keyed_uid(salt: str, uid: str) -> str:
    """A UID as stored in the file index: HMAC-keyed, so equality survives and the UID does not."""
    return "k-" + _digest(salt, "uid:" + uid) if uid else ""


def dicom_subject_id(salt: str, ids: dict[str, str]) -> str:
    """Pseudonym from PatientID, else PatientName + BirthDate, else StudyInstanceUID."""
    if "pseudonym" in ids:  # already pseudonymised (a header from the file index)
        return ids["pseudonym"]
    if ids.get("PatientID"):
        return _subject_id(salt, "pid:" + ids["PatientID"])
    if ids.get("PatientName"):
        return _subject_id(salt, f"pname:{ids['PatientName']}|{ids.get('PatientBirthDate', '')}")
    if ids.get("StudyInstanceUID"):
        return _subject_id(salt, "study:" + ids["StudyInstanceUID"])
    return ""
