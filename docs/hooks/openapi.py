"""MkDocs hook: the HTTP API page is rendered from the explorer app's own OpenAPI schema.

``create_app(...).openapi()`` needs no database and no network, so the page is always the schema
of the code being documented (never a stale copy). The schema itself is published beside the
page as ``openapi.json``.
"""

from __future__ import annotations

import json
from typing import Any

from mkdocs.structure.files import File, Files

PAGE = "http-api.md"
MARKER = "<!-- openapi -->"


def _schema() -> dict[str, Any]:
    from hhrlhf.explorer.app import create_app

    # The database is opened on the first request only; the schema needs none.
    return create_app("explorer-schema-only.sqlite").openapi()


def _type(schema: dict[str, Any]) -> str:
    """A short type name: 'string', 'integer (0-100000)', 'pairs | redteam', 'array of SearchHit'."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        parts = [_type(s) for s in schema["anyOf"] if s.get("type") != "null"]
        nullable = any(s.get("type") == "null" for s in schema["anyOf"])
        return " \\| ".join(parts) + (" or null" if nullable else "")
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if schema.get("type") == "array":
        return "array of " + _type(schema.get("items", {}))
    t = str(schema.get("type", "any"))
    bounds = [f"{k} {schema[k]}" for k in ("minimum", "maximum", "maxLength") if k in schema]
    return t + (f" ({', '.join(bounds)})" if bounds else "")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(schema: dict[str, Any]) -> str:
    out: list[str] = [schema["info"].get("description", "").strip(), ""]
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            out += [f"## `{method.upper()} {path}`", "", op.get("summary", ""), ""]
            if op.get("description"):
                out += [op["description"].strip(), ""]
            params = op.get("parameters", [])
            if params:
                out += ["| parameter | in | type | default | description |",
                        "|---|---|---|---|---|"]
                for p in params:
                    s = p.get("schema", {})
                    default = f"`{json.dumps(s['default'])}`" if "default" in s else ""
                    required = " (required)" if p.get("required") else ""
                    out.append(f"| `{p['name']}`{required} | {p['in']} | {_type(s)} | {default} "
                               f"| {_cell(p.get('description', ''))} |")
                out.append("")
            out += ["| status | meaning | body |", "|---|---|---|"]
            for code, resp in op.get("responses", {}).items():
                body = resp.get("content", {}).get("application/json", {}).get("schema", {})
                out.append(f"| {code} | {_cell(resp.get('description', ''))} "
                           f"| {_type(body) if body else ''} |")
            out.append("")
    out += ["## Schemas", ""]
    for name, s in schema.get("components", {}).get("schemas", {}).items():
        out += [f"### {name}", ""]
        if s.get("description"):
            out += [_cell(s["description"]), ""]
        props = s.get("properties", {})
        if props:
            required = set(s.get("required", []))
            out += ["| field | type | description |", "|---|---|---|"]
            for field, fs in props.items():
                mark = "" if field in required else " (optional)"
                out.append(f"| `{field}`{mark} | {_type(fs)} | {_cell(fs.get('description', ''))} |")
            out.append("")
    return "\n".join(out)


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "openapi.json",
                                content=json.dumps(_schema(), indent=2) + "\n"))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lost its {MARKER} marker")
    return markdown.replace(MARKER, render(_schema()))
