"""``data.chat_template``: a name in ``conf/chat_templates/`` or a ``.jinja`` file, resolved to its text."""

from __future__ import annotations

from pathlib import Path

from marl_exp.errors import ConfigError

TEMPLATE_DIR = Path(__file__).resolve().parents[3] / "conf" / "chat_templates"


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


def resolve_template(spec: str) -> str:
    """The Jinja text of ``data.chat_template``: a built-in name or a file path."""
    path = Path(spec)
    if not path.is_file():
        path = TEMPLATE_DIR / f"{spec}.jinja"
    if not path.is_file():
        raise ConfigError(f"data.chat_template={spec!r} is neither a file nor a built-in template "
                          f"({', '.join(template_names())}); give a .jinja file or one of those names")
    return path.read_text()
