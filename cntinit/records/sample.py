"""One calibration sample from one record: `text` (or the field named), chat `messages` rendered with
the tokenizer's chat template, or `prompt` + `completion` — strings, or message lists — whose prompt
tokens a gradient capture does not predict; and the images a vision-language model reads with it
(`image` or `images`, paths relative to the record's file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CntinitError


@dataclass(frozen=True)
class Sample:
    content: str | list  # text, or a list of chat messages
    origin: str  # "file:line" or "file row N", for error messages
    prompt: str | list | None = None  # the leading part that is context, not a target (prompt/completion records)
    images: tuple[str, ...] = ()  # image files, for a vision-language model

    @property
    def is_chat(self) -> bool:
        return isinstance(self.content, list)


def from_record(record, where: str, field: str, base: Path | None = None) -> Sample:
    """The sample a record (a JSON object, a table row) holds, or the error naming `where` it is; with
    a `base` (the record's folder, for a vision-language model), its images too, relative to it."""
    if not isinstance(record, dict):
        raise CntinitError(f"{where}: expected a JSON object with '{field}' or 'messages'")
    pictures = _images(record, where, base) if base is not None else ()
    if isinstance(record.get(field), str):
        return Sample(record[field], where, images=pictures)
    if isinstance(record.get("messages"), list):
        return Sample(messages(record["messages"], where), where, images=pictures)
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        prompt = messages(prompt, where)
        return Sample(prompt + messages(completion, where, len(prompt)), where, prompt, pictures)
    if isinstance(prompt, str) and isinstance(completion, str):
        return Sample(prompt + completion, where, prompt, pictures)
    if prompt is not None and completion is not None:
        raise CntinitError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of chat messages")
    raise CntinitError(f"{where}: no string field '{field}', no 'messages' list and no 'prompt' + 'completion' pair: "
                       "pass --field NAME")


def _images(record: dict, where: str, base: Path) -> tuple[str, ...]:
    """The record's `images` (a list of paths) or `image` (one), resolved against `base`."""
    listed = record.get("images", [record["image"]] if record.get("image") is not None else [])
    if listed is None:
        listed = []
    if isinstance(listed, str) or not isinstance(listed, list) or not all(isinstance(item, str) and item for item in listed):
        raise CntinitError(f"{where}: 'images' must be a list of image paths (or 'image' one path): fix or remove that line")
    return tuple(str(base / item) for item in listed)  # an absolute item stays itself


def messages(listed: list, where: str, first: int = 0) -> list:
    """Chat messages as chat templates read them: objects with a string role and a content that is
    text, or a list of typed parts ({"type": "text", "text": ...}); numbered from `first` in errors."""
    for number, message in enumerate(listed, start=first):
        if not isinstance(message, dict):
            raise CntinitError(f"{where}: message {number} is not a JSON object: write {{\"role\": ..., \"content\": ...}}")
        if not isinstance(message.get("role"), str):
            raise CntinitError(f"{where}: message {number} has no string 'role' (user, assistant, system): fix or remove that line")
        if "content" not in message:
            raise CntinitError(f"{where}: message {number} has no content: fix or remove that line")
        content = message["content"]
        if not (isinstance(content, str) or isinstance(content, list) and all(isinstance(part, dict) and isinstance(part.get("type"), str)
                                                                              for part in content)):
            raise CntinitError(f"{where}: message {number}'s content is neither text nor a list of typed parts "
                               "({\"type\": \"text\", \"text\": ...}): fix or remove that line")
    return listed
