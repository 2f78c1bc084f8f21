"""Label Studio: the import file we publish, the labeling configs, and the exports we read.

Exports come in three shapes, and every one of them parses to the same votes:

- **JSON** (full): a list of tasks ``{"id", "data": {...}, "annotations": [...], "predictions": [...]}``;
  each annotation has ``id``, ``completed_by``, ``was_cancelled``, ``result`` (a list of
  ``{"type": "choices", "from_name": ..., "value": {"choices": [...]}}`` or, for rankings,
  ``{"type": "ranker", "value": {"ranker": {"<name>": [ids]}}}``).
- **JSON_MIN**: one flat record per annotation: the task's data fields, ``annotator``,
  ``annotation_id``, and the control's name as a key (``"concept": "striped"``).
- **CSV**: the same columns as JSON_MIN.

Only human annotations count: ``predictions`` are model pre-labels, and cancelled annotations
or empty results are no labels at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CONTROL = "concept"  # name of the Choices control (binary) in our labeling config
RANKER = "rank"  # name of the Ranker control
IMAGE = "image"  # name of the Image object tag / the data field holding the URL


class FeedbackError(ValueError):
    """Bad feedback input: one line of at most ``MAX_MESSAGE`` characters naming the file, the
    record and the field. Long parts are cut (a 50 MB id must not become a 50 MB log line)."""

    MAX_MESSAGE = 300

    def __init__(self, file: str, record: int | str | None, field: str | None, problem: str) -> None:
        file = _cut(str(file), 90, keep_end=True)  # the end of a path names the file
        where = file if record is None else f"{file}: record {_cut(str(record), 20)}"
        where += f", field '{_cut(str(field), 50)}'" if field else ""
        line = f"{where}: {problem}"
        super().__init__(_cut(" ".join(line.split()), self.MAX_MESSAGE))

    def __reduce__(self) -> tuple:
        # Rebuilt from its one-line message: a worker process's error reaches its parent whole
        # (the default would call __init__ with that one argument and fail).
        return _rebuild, (str(self),)


def _rebuild(message: str) -> FeedbackError:
    e = FeedbackError.__new__(FeedbackError)
    ValueError.__init__(e, message)
    return e


def _cut(text: str, limit: int, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    return "..." + text[-(limit - 3) :] if keep_end else text[: limit - 3] + "..."


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    return _cut(repr(value) if not isinstance(value, (dict, list)) else type(value).__name__, limit)


MAX_DEPTH = 32
"""How deeply an export may nest (Label Studio's full export nests 7 levels)."""


class _Refused(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"duplicate key {shown(key, 40)} in one object")
            seen.add(key)
    return out


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number JSON allows")


def strict_json(text: str, source: str, record: int | None = None, field: str | None = None) -> Any:
    """``json.loads`` that refuses NaN, Infinity, duplicate keys and nesting deeper than
    ``MAX_DEPTH``, with a ``FeedbackError`` naming where (Python's own json accepts the first
    three silently and meets deep nesting with a RecursionError)."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if record is None else f"column {e.colno}"
        raise FeedbackError(source, record, field, f"invalid JSON: {e.msg} at {at}") from None
    except _Refused as e:
        raise FeedbackError(source, record, field, f"invalid JSON: {e}") from None
    except RecursionError:
        raise FeedbackError(source, record, field, f"nested more than {MAX_DEPTH} levels deep") from None
    stack = [(data, 1)]
    while stack:  # iterative: a depth check must not itself recurse
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FeedbackError(source, record, field, f"nested more than {MAX_DEPTH} levels deep")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return data


@dataclass(frozen=True)
class Vote:
    """One annotator's binary judgement of one image."""

    source: str
    record: int
    annotation_id: str
    annotator: str
    image_id: str
    label: int  # 1: shows the concept
    updated_at: str | None = None
    """When the annotation was last saved (full JSON exports): a later export of an edited
    annotation carries the same id with a later time, and that edit wins."""


@dataclass(frozen=True)
class Ranking:
    """One annotator's order of several images, strongest concept first."""

    source: str
    record: int
    annotation_id: str
    annotator: str
    image_ids: tuple[str, ...]


def binary_label_config(positive: str, negative: str) -> str:
    """The Label Studio labeling config of a binary judgement."""
    return f"""<View>
  <Header value="Does this image show the concept?"/>
  <Text name="prompt" value="$prompt"/>
  <Image name="{IMAGE}" value="${IMAGE}" zoom="true"/>
  <Choices name="{CONTROL}" toName="{IMAGE}" choice="single-radio" required="true">
    <Choice value="{positive}" hotkey="1"/>
    <Choice value="{negative}" hotkey="2"/>
  </Choices>
</View>
"""


def ranking_label_config() -> str:
    """The Label Studio labeling config of a ranking: drag the strongest concept to the top."""
    return f"""<View>
  <Header value="Order the images: the one that shows the concept most strongly first"/>
  <Text name="prompt" value="$prompt"/>
  <List name="images" value="$items" title="Images"/>
  <Ranker name="{RANKER}" toName="images"/>
</View>
"""


def binary_tasks(rows: list[dict[str, Any]], url_of: dict[str, str]) -> list[dict]:
    """Import tasks, one per image: ``{"data": {"image", "image_id", "prompt", "seed", "group"}}``."""
    return [
        {
            "data": {
                IMAGE: url_of[r["image_id"]],
                "image_id": r["image_id"],
                "prompt": r["prompt"],
                "seed": int(r["seed"]),
                "group": r["group"],
            }
        }
        for r in rows
    ]


def ranking_tasks(
    rows: list[dict[str, Any]], url_of: dict[str, str], group_size: int = 4, by: str = "prompt", seed: int = 0
) -> list[dict]:
    """Import tasks of ``group_size`` images each (a ranking needs >= 2).

    ``by="prompt"``: images of one prompt (METHOD.md); ``by="batch"``: images across prompts, in a
    seeded shuffle, for models that draw every image of a prompt alike (nothing to rank within it).
    """
    by_prompt: dict[tuple[str, str], list[dict]] = {}
    if by == "batch":
        import random

        shuffled = list(rows)
        random.Random(seed).shuffle(shuffled)
        by_prompt[("batch", "")] = shuffled
    else:
        for r in rows:
            by_prompt.setdefault((r["group"], r["prompt"]), []).append(r)
    tasks = []
    for (group, prompt), rs in by_prompt.items():
        for i in range(0, len(rs), group_size):
            chunk = rs[i : i + group_size]
            if len(chunk) < 2:
                continue
            items = [{"id": r["image_id"], "html": f'<img src="{url_of[r["image_id"]]}" width="256"/>'} for r in chunk]
            tasks.append(
                {
                    "data": {
                        "items": items,
                        "prompt": prompt,
                        "group": group,
                        "image_urls": [url_of[r["image_id"]] for r in chunk],
                    }
                }
            )
    return tasks


# ----------------------------------------------------------------------------- parsing


def annotator_of(ann: dict) -> str:
    """Who made an annotation: full exports give an int user id, or a dict with id/email."""
    value = ann.get("completed_by")
    if isinstance(value, dict):
        return str(value.get("email") or value.get("id"))
    return str(value)


def parse_full_export(tasks: Any, source: str) -> tuple[list[tuple[int, dict, dict]], int]:
    """Flatten a full JSON export into ``(task_index, data, annotation)`` for every human annotation.

    Returns the annotations that count and how many were skipped (cancelled or empty).
    """
    if not isinstance(tasks, list):
        raise FeedbackError(source, None, None, f"expected a JSON array of tasks, got {type(tasks).__name__}")
    out, skipped = [], 0
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise FeedbackError(source, i, None, f"expected a task object, got {type(task).__name__}")
        data = task.get("data")
        if not isinstance(data, dict):
            raise FeedbackError(source, i, "data", "missing or not an object")
        annotations = task.get("annotations", [])
        if not isinstance(annotations, list):
            raise FeedbackError(source, i, "annotations", "expected a list")
        for j, ann in enumerate(annotations):
            if not isinstance(ann, dict):
                raise FeedbackError(source, i, f"annotations[{j}]", "expected an object")
            if ann.get("was_cancelled") or not ann.get("result"):
                skipped += 1
                continue
            if "id" not in ann:
                raise FeedbackError(source, i, f"annotations[{j}].id", "missing")
            out.append((i, data, ann))
        # task["predictions"] are model pre-labels: never read.
    return out, skipped


def choices_of(ann: dict, source: str, record: int, control: str = CONTROL) -> list[str]:
    """The choices an annotation made in our control (results of other controls are ignored)."""
    results = ann.get("result")
    if not isinstance(results, list):
        raise FeedbackError(source, record, "result", "expected a list")
    mine = [r for r in results if isinstance(r, dict) and r.get("type") == "choices" and r.get("from_name") == control]
    if not mine:
        names = sorted({str(r.get("from_name")) for r in results if isinstance(r, dict)})
        raise FeedbackError(source, record, "result", f"no 'choices' result from control '{control}' (found {names})")
    choices = []
    for r in mine:
        value = r.get("value")
        if not isinstance(value, dict) or not isinstance(value.get("choices"), list):
            raise FeedbackError(source, record, "result.value.choices", "expected a list of strings")
        choices += value["choices"]
    return choices


def ranking_of(ann: dict, source: str, record: int, control: str = RANKER) -> list[str]:
    """The ordered item ids of a Ranker result."""
    for r in ann.get("result") or []:
        if isinstance(r, dict) and r.get("type") == "ranker" and r.get("from_name") == control:
            ranker = (r.get("value") or {}).get("ranker")
            order = ranker.get(control) if isinstance(ranker, dict) else ranker
            if not isinstance(order, list) or not all(isinstance(x, str) for x in order):
                raise FeedbackError(source, record, "result.value.ranker", "expected a list of image ids")
            return order
    raise FeedbackError(source, record, "result", f"no 'ranker' result from control '{control}'")


def parse_min_choice(cell: Any, source: str, record: int, field: str) -> list[str]:
    """A JSON_MIN/CSV control cell: ``"striped"``, or ``{"choices": [...]}`` (as JSON or a string)."""
    if isinstance(cell, str) and cell.startswith("{"):
        cell = strict_json(cell, source, record, field)
    if isinstance(cell, dict):
        choices = cell.get("choices")
        if not isinstance(choices, list):
            raise FeedbackError(source, record, field, "expected {'choices': [...]}")
        return [str(c) for c in choices]
    if cell is None or cell == "":
        return []
    return [str(cell)]


def import_batch(
    rows: list[dict[str, Any]],
    url_of: dict[str, str],
    kind: str,
    positive: str,
    negative: str,
    ranking_group: str = "prompt",
) -> tuple[list[dict], str]:
    """The Label Studio import tasks of a generated batch and the labeling config (XML) to match."""
    if kind == "binary":
        return binary_tasks(rows, url_of), binary_label_config(positive, negative)
    return ranking_tasks(rows, url_of, by=ranking_group), ranking_label_config()


def image_urls(manifest_rows: list[dict[str, Any]], prefix: str) -> dict[str, str]:
    """image_id -> the URL Label Studio shows: ``prefix`` + the manifest's relative ``uri``."""
    return {r["image_id"]: prefix + r["uri"] for r in manifest_rows}


def local_files_prefix(image_root: str) -> str:
    """Label Studio's local-file serving URL for a folder (``LOCAL_FILES_SERVING_ENABLED``)."""
    return f"/data/local-files/?d={image_root.rstrip('/')}/"
