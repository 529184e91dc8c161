"""Which repository URLs a push may name: the rule the orchestrator applies at the door and
the workers apply again before they clone.

By default any remote git URL (`https://`, `http://`, `ssh://`, `git://`, or scp-style
`user@host:path`); never a transport that runs commands (`ext::`, `fd::`). Local paths and
`file://` URLs would let a push clone any repository on a worker's disk, so they need
`CISTATE_ALLOW_LOCAL_REPOS=1`, or a match in `CISTATE_REPO_ALLOW` (URL globs; when set,
every repository must match one).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

REMOTE_SCHEMES = ("https://", "http://", "ssh://", "git://")
_SCP_STYLE = re.compile(r"^(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9.-]+:(?!//)[^\s]+$")
_CREDENTIALS = re.compile(r"(?<=://)[^/@]+@")


@dataclass(frozen=True)
class RepoPolicy:
    allow_local: bool = False
    allowed: Sequence[str] = ()  # URL globs; empty: every remote URL

    def problem(self, url: str) -> str | None:
        """Why a push may not name `url`, with what to change; None when it may."""
        shown = _CREDENTIALS.sub("", url)
        lowered = url.lower()
        if not url or url.startswith("-") or any(c in url for c in "\x00\n\r"):
            return f"repo URL {shown!r} is not a usable git URL"
        if lowered.startswith(("ext::", "fd::")) or "::" in url.split("/", 1)[0]:
            return f"repo URL {shown!r} uses a git transport that runs commands; refused"
        if self.allowed:
            if any(fnmatch.fnmatchcase(shown, pattern) for pattern in self.allowed):
                return None
            return (f"repo URL {shown!r} matches none of CISTATE_REPO_ALLOW "
                    f"({', '.join(self.allowed)})")
        if lowered.startswith(REMOTE_SCHEMES) or (
                "://" not in url and _SCP_STYLE.match(url) and not url.startswith((".", "/"))):
            return None
        if lowered.startswith("file://") or "://" not in url:
            if self.allow_local:
                return None
            return (f"repo URL {shown!r} is a path on the worker's disk; a push may name only "
                    "remote repositories (https://, ssh://, git://, user@host:path) unless "
                    "CISTATE_ALLOW_LOCAL_REPOS=1 or CISTATE_REPO_ALLOW names it")
        return (f"repo URL {shown!r} has a scheme cistate does not clone from "
                f"(use {', '.join(REMOTE_SCHEMES)} or user@host:path)")
