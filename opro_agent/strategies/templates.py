"""A strategy's prompts are text files in a folder: a built-in one under `meta_prompts/`,
or a folder of the user's with the same files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from opro_agent.errors import ConfigError
from opro_agent.meta_prompt import builtin_template_dir, read_template

__all__ = ["load_templates"]


def load_templates(
    name_or_path: str,
    names: Sequence[str],
    *,
    field: str,
    samples: Mapping[str, Mapping[str, object]],
) -> dict[str, str]:
    """Each of `names` (`NAME.txt`) from the folder, `tag.txt` stripped. Every template is
    formatted once with its `samples` values, so a bad placeholder fails before a run."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        folder = builtin_template_dir() / name_or_path
    if not folder.is_dir():
        raise ConfigError(f"no template folder {name_or_path!r}", field=field)
    texts = {
        name: read_template(folder, f"{name}.txt", required=True, field=field) or ""
        for name in names
    }
    if "tag" in texts:
        texts["tag"] = texts["tag"].strip()
        if not texts["tag"].isalnum():
            raise ConfigError("must hold one alphanumeric tag name", source=str(folder / "tag.txt"))
    for name, values in samples.items():
        try:
            texts[name].format(**values)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"bad placeholder in {name}.txt: {exc}", source=str(folder), field=field
            ) from None
    return texts
