"""docs/CONFIGURATION.md, generated from the settings classes of ``tritonrag.server.config``.

Regenerate with ``make docs`` (``python -m tritonrag.deploy.config_reference``); a unit test fails while it is stale.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import re
import textwrap
import tokenize
from enum import Enum
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from tritonrag.server.config import REPO_ROOT, Settings

OUTPUT = REPO_ROOT / "docs" / "CONFIGURATION.md"
BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))

HEADER = """\
# Configuration reference

Generated from the settings classes in `server/config.py` by `make docs`; do not edit by hand.

Every setting comes from, in this order of precedence: an explicit argument, its environment
variable, the YAML file given with `--config` (at its YAML path), its default. Lists and mappings are
given to environment variables as JSON, e.g. `TRITONRAG_TRITON__MODELS='["embedder"]'`. In defaults,
`<repo>` is the repository's root.
"""


def _field_comments(model: type[BaseModel]) -> dict[str, str]:
    """Each field's ``# comments`` in the source: the lines just above it, then the one after it.

    Most settings are described by comments in server/config.py rather than by ``Field(description=...)``,
    which would be as long and harder to read there; this reads them where their authors write them.
    """
    source = textwrap.dedent(inspect.getsource(model))
    lines = source.splitlines()
    comments = {
        token.start[0]: token.string.removeprefix("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    described = {}
    (definition,) = ast.parse(source).body
    assert isinstance(definition, ast.ClassDef)
    for node in definition.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            first = node.lineno
            while first - 1 in comments and lines[first - 2].lstrip().startswith("#"):
                first -= 1
            rows = range(first, (node.end_lineno or node.lineno) + 1)
            described[node.target.id] = " ".join(comments[row] for row in rows if row in comments)
    return described


def _cell(text: str) -> str:
    """``text`` as code in a table cell, its pipes escaped."""
    return "`" + text.replace("|", "\\|") + "`"


def _type(annotation: Any) -> str:
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " \\| ".join(_cell(member.value) for member in annotation)
    name = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return _cell(re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", name))  # typing.Any, pathlib.Path: Any, Path


def _default(default: Any) -> str:
    value = to_jsonable_python(default)
    text = value if isinstance(value, str) else json.dumps(value)
    return _cell(text.replace(str(REPO_ROOT), "<repo>"))


def _constraints(field: FieldInfo) -> str:
    return ", ".join(
        f"{symbol} {getattr(item, name)}" for item in field.metadata for name, symbol in BOUNDS if hasattr(item, name)
    )


def _sections(model: type[BaseModel], path: tuple[str, ...], defaults: BaseModel | None = None) -> list[str]:
    """The section of ``model`` at ``path`` (its own settings), then those of its nested sections; the defaults
    are those of ``defaults``, the section's default value, when given (it may differ from its class's)."""
    prefix, delimiter = Settings.model_config["env_prefix"], Settings.model_config["env_nested_delimiter"]
    assert isinstance(prefix, str) and isinstance(delimiter, str)
    comments = _field_comments(model)
    rows, nested = [], []
    for name, field in model.model_fields.items():
        if defaults is None:
            default = field.get_default(call_default_factory=True, validated_data={})
        else:
            default = getattr(defaults, name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            nested += _sections(field.annotation, (*path, name), default)
            continue
        env = prefix + delimiter.join((*path, name)).upper()
        description = (field.description or comments[name]).replace("|", "\\|")
        rows.append(
            f"| `{'.'.join((*path, name))}` | `{env}` | {_type(field.annotation)} | {_default(default)} "
            f"| {_constraints(field)} | {description} |"
        )
    title = f"`{'.'.join(path)}`" if path else "Top level"
    table = ["| YAML path | Environment variable | Type | Default | Constraints | Description |", "|---" * 6 + "|"]
    return [f"## {title}", "", inspect.cleandoc(model.__doc__ or ""), "", *table, *rows, "", *nested]


def render() -> str:
    """The whole of docs/CONFIGURATION.md."""
    return "\n".join([HEADER, *_sections(Settings, ())])


def main() -> None:
    """Write docs/CONFIGURATION.md."""
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
