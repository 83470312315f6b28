"""Where the configuration comes from: the files, in reading order, and their identity.

Files are read in order, later ones winning per option and same-named sections merging (as
in Vac): sorted ``<dir>/<stem>.d/*.conf``, the main file, Vac's ``/var/run/vac.conf`` when the
main file is a ``vac.conf``, and last the runtime override ``<state_dir>/runtime.conf`` (found
from the state_dir the earlier files give, so it may not set state_dir itself). A Vac site's
files (Vac's paths, or asked for) are read as Vac reads them (:mod:`.sections`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from vacfactory.config import options as table
from vacfactory.config.model import SourceStamp

logger = logging.getLogger(__name__)

DEFAULT_MAIN_FILE = "/etc/vacfactory.conf"
DEFAULT_DROPIN_DIR = "/etc/vacfactory.d"
#: Vac's runtime file, read after /etc/vac.conf when pointed at a Vac configuration.
VAC_RUNTIME_FILE = "/var/run/vac.conf"
#: Vac's own files: reading any of them (or a file named vac.conf) reads the configuration as Vac's.
VAC_MAIN_FILE = "/etc/vac.conf"
VAC_DROPIN_DIR = "/etc/vac.d"

DEFAULT_SECTION = "\n"  # configparser's DEFAULT section, renamed to something no header can be
#: the kind of a Vac file's [DEFAULT] section while files are merged (no header maps to it)
_VAC_DEFAULTS = "\nDEFAULT"


def is_vac_path(path: str) -> bool:
    """A Vac site's file: /etc/vac.conf, /etc/vac.d/*, /var/run/vac.conf, or any file named vac.conf."""
    absolute = os.path.abspath(path)
    return (os.path.basename(absolute) == "vac.conf"
            or absolute in (VAC_MAIN_FILE, VAC_RUNTIME_FILE, "/run/vac.conf")
            or absolute.startswith(VAC_DROPIN_DIR + "/"))


@dataclass(frozen=True)
class ConfigSources:
    """Where the configuration comes from, in reading order (see the module docstring)."""

    main_file: Optional[str]
    dropin_dir: Optional[str]
    #: a missing main file is an error (it was named explicitly)
    main_required: bool = True
    #: files read after the main file if they exist (Vac's /var/run/vac.conf)
    late_files: Tuple[str, ...] = ()
    override_name: str = table.RUNTIME_OVERRIDE_NAME
    #: the files before the override are a Vac site's, read as Vac 03.01 reads them (the
    #: override, which vacfactory writes, is always read strictly)
    vac: bool = False

    @classmethod
    def default(cls) -> "ConfigSources":
        """/etc/vacfactory.d/*.conf, /etc/vacfactory.conf, then the runtime override."""
        return cls(main_file=DEFAULT_MAIN_FILE, dropin_dir=DEFAULT_DROPIN_DIR, main_required=False)

    @classmethod
    def for_main_file(cls, path: str, vac_runtime_file: str = VAC_RUNTIME_FILE,
                      vac: Optional[bool] = None) -> "ConfigSources":
        """``<dir>/<stem>.d/*.conf`` and ``path``; a ``vac.conf`` also gets Vac's runtime file.

        ``vac``: read the files as Vac's (None: when ``path`` is one of Vac's, see is_vac_path).
        As in Vac, a missing main file is then skipped (the drop-ins may hold everything).
        """
        directory, base = os.path.split(path)
        stem = os.path.splitext(base)[0]
        vac = is_vac_path(path) if vac is None else vac
        if base == "vac.conf":
            return cls(main_file=path, dropin_dir=os.path.join(directory, "vac.d"),
                       late_files=(vac_runtime_file,), main_required=not vac, vac=vac)
        return cls(main_file=path, dropin_dir=os.path.join(directory, stem + ".d"), main_required=not vac, vac=vac)

    def dropin_files(self) -> List[str]:
        """The ``*.conf`` files of the drop-in directory, sorted by name."""
        if not self.dropin_dir:
            return []
        try:
            names = os.listdir(self.dropin_dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as error:
            logger.warning("cannot list %s: %s", self.dropin_dir, error)
            return []
        # hidden names are editor droppings (.#x.conf), never configuration
        return [os.path.join(self.dropin_dir, n) for n in sorted(names)
                if n.endswith(".conf") and not n.startswith(".")]

    def base_files(self) -> List[str]:
        """Every file to read before the override, in order."""
        files = self.dropin_files()
        if self.main_file and (self.main_required or os.path.exists(self.main_file)):
            files.append(self.main_file)
        files.extend(f for f in self.late_files if os.path.exists(f))
        return files

    def override_path(self, state_dir: str) -> str:
        return os.path.join(state_dir, self.override_name)

    def stamps(self, override_path: Optional[str], extra: Tuple[str, ...] = ()) -> Tuple[SourceStamp, ...]:
        """Cheap identity of every source now: one listdir and one stat per file.

        ``extra`` are further files the configuration depends on (the vacuum pipe caches).
        """
        paths = self.base_files() + ([override_path] if override_path else []) + list(extra)
        return tuple(stamp(p) for p in paths)


def stamp(path: str) -> SourceStamp:
    try:
        st = os.stat(path)
    except OSError:
        return SourceStamp(path, None, None)
    return SourceStamp(path, st.st_mtime_ns, st.st_size, st.st_ino)

