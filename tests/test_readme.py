"""
The README's examples run as written: its server command serves its
interface, and both of its clients print what they should.
"""

from __future__ import annotations

from pathlib import Path

from docexamples import ROOT, blocks, files, run_script, serving, twistd_command

README = ROOT / "README.md"


def test_readme_examples_run(tmp_path: Path) -> None:
    examples = files(README)
    assert sorted(examples) == ["client_async.py", "client_inline.py", "hasher.py"]
    for name, text in examples.items():
        (tmp_path / name).write_text(text)

    command = twistd_command("\n".join(blocks(README, "sh")))
    with serving(command, tmp_path) as env:
        inline = run_script("client_inline.py", tmp_path, env)
        async_ = run_script("client_async.py", tmp_path, env)

    assert inline.splitlines() == ["inline: verified True"]
    assert async_.splitlines() == [
        "async: verified True",
        "async: remote AttributeError",
    ]
