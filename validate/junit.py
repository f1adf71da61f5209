"""JUnit XML for CI systems: one <testcase> per check (threshold or baseline), failures with the message."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from xml.etree import ElementTree as ET

from qkiln.atomic import atomic_file
from qkiln.validate.gates import Check


def junit_xml(checks: Iterable[Check], *, suite: str = "qkiln") -> bytes:
    """<testsuites><testsuite name=suite> with a testcase per check (classname = artifact, name = threshold)."""
    checks = list(checks)
    root = ET.Element("testsuites")
    failures = sum(not c.passed for c in checks)
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(checks)), failures=str(failures), errors="0")
    for c in checks:
        case = ET.SubElement(ts, "testcase", classname=c.artifact, name=c.threshold)
        if not c.passed:
            ET.SubElement(case, "failure", message=c.message, type="threshold").text = c.message
        else:
            ET.SubElement(case, "system-out").text = c.message
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(path: Path, checks: Iterable[Check], *, suite: str = "qkiln") -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(junit_xml(checks, suite=suite))
