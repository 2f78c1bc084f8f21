"""The one module that talks to a Label Studio server (through ``label-studio-sdk``).

- ``publish``: the concept's project, created once with our labeling config; each night's new
  images are imported as tasks (an image already in the project is not imported twice);
- ``pull_export``: the project's full JSON export of annotated tasks, byte for byte, for the
  feedback inbox;
- ``annotate_as``: the toy world's simulated people label through the API like people do:
  each annotator is a Label Studio user, and each annotation is created ``completed_by`` them.

The API token is passed in by the caller (the step reads ``LABEL_STUDIO_API_KEY``); it is never
part of a config, a log line or an error message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TIMEOUT_S = 60


def _client(url: str, token: str | None) -> Any:
    from label_studio_sdk import LabelStudio

    if not token:
        raise ValueError(f"Label Studio at {url}: no API token; set LABEL_STUDIO_API_KEY in the step's environment")
    return LabelStudio(base_url=url.rstrip("/"), api_key=token, timeout=TIMEOUT_S)


def project_title(title: str, concept: str) -> str:
    return title or f"hfi {concept}"


@dataclass
class Project:
    """A Label Studio project of one concept."""

    client: Any
    id: int
    title: str

    @staticmethod
    def open(url: str, token: str | None, title: str, label_config: str | None = None) -> Project:
        """The project called ``title``; created with ``label_config`` when there is none yet."""
        client = _client(url, token)
        found = [p for p in client.projects.list(title=title) if p.title == title]
        if found:
            return Project(client, found[0].id, title)
        if label_config is None:
            raise ValueError(f"Label Studio at {url}: no project {title!r}; publish a batch first")
        created = client.projects.create(title=title, label_config=label_config)
        return Project(client, created.id, title)

    def tasks(self) -> list[Any]:
        """Every task of the project, with its data and annotations."""
        return list(self.client.tasks.list(project=self.id, fields="all", page_size=500))

    def import_new(self, tasks: list[dict], key: str) -> dict[str, int]:
        """Import the tasks whose ``data[key]`` is not in the project yet."""
        known = {_task_key(t.data, key) for t in self.tasks()}
        new = [t for t in tasks if _task_key(t["data"], key) not in known]
        if new:
            self.client.projects.import_tasks(self.id, request=new, commit_to_project=True)
        return {"project": self.id, "imported": len(new), "already_there": len(tasks) - len(new)}

    def export(self) -> bytes | None:
        """The full JSON export of the annotated tasks, or ``None`` while nothing is annotated."""
        data = b"".join(self.client.projects.exports.download_sync(self.id, export_type="JSON"))
        tasks = json.loads(data)
        return data if any(t.get("annotations") for t in tasks) else None

    def user(self, email: str) -> int:
        """The id of the user with ``email``, created when missing (the simulated annotators)."""
        for u in self.client.users.list():
            if u.email == email:
                return u.id
        return self.client.users.create(username=email.split("@")[0], email=email).id


def _task_key(data: dict, key: str) -> str:
    """What makes a task the same task: its image id, or a ranking's ordered image ids."""
    if key in data:
        return str(data[key])
    return "|".join(it["id"] for it in data.get("items", []))


def publish(
    url: str, token: str | None, title: str, label_config: str, tasks: list[dict], key: str = "image_id"
) -> dict[str, int]:
    """Create the project once and import the batch's new tasks; returns the counts."""
    return Project.open(url, token, title, label_config).import_new(tasks, key)


def pull_export(url: str, token: str | None, title: str) -> bytes | None:
    """The project's export of everything labelled so far (``None`` when nothing is)."""
    return Project.open(url, token, title).export()


def annotate_as(url: str, token: str | None, title: str, labelled: list[dict], key: str = "image_id") -> dict[str, int]:
    """Post the annotations of ``labelled`` (tasks of an export: ``data`` and ``annotations`` whose
    ``completed_by`` is an annotator number) as that many users, to the project's matching tasks.
    An annotator who already annotated a task is not asked again."""
    project = Project.open(url, token, title)
    by_key = {_task_key(t.data, key): t for t in project.tasks()}
    users: dict[Any, int] = {}
    made = skipped = 0
    for task in labelled:
        target = by_key.get(_task_key(task["data"], key))
        if target is None:
            raise ValueError(f"Label Studio project {title!r}: no task for {_task_key(task['data'], key)!r}")
        done = {a.get("completed_by") if isinstance(a, dict) else a.completed_by for a in target.annotations or []}
        for ann in task["annotations"]:
            who = ann["completed_by"]
            if who not in users:
                users[who] = project.user(f"annotator-{who}@hfi.local")
            if users[who] in done:
                skipped += 1
                continue
            project.client.annotations.create(
                target.id, result=ann["result"], completed_by=users[who], lead_time=ann.get("lead_time", 1.0)
            )
            made += 1
    return {"annotations": made, "already_there": skipped, "annotators": len(users)}
