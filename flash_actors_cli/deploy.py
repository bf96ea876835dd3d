"""``flash deploy new|send|list|info|delete`` and ``flash undeploy list|NAME``.

Environments of a Flash app, the builds they run, and the endpoints deployed, through
`flash_actors.providers.runpod.flash_apps.FlashApps` on ``flash local`` (default) or RunPod
(``--target runpod``). ``flash env`` (`flash_actors_cli.apps`) shares these functions.
``send`` then saves the build's endpoints itself, as runpod-flash does
(`flash_actors.providers.runpod.environments.reconcile`): the same code for both targets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from flash_actors.providers.runpod.environments import plan, reconcile
from flash_actors_cli._target import (
    CommandError,
    add_common,
    app_name,
    confirm,
    confirm_deletion,
    connect,
    print_json,
    print_table,
    run,
    say,
    short,
    step,
)

if TYPE_CHECKING:
    import argparse

    from flash_actors_cli._target import Target

__all__ = [
    "add_parser",
    "add_undeploy_parser",
    "create_environment",
    "delete_environment",
    "environment_info",
    "list_environments",
    "remove_endpoints",
    "run_deploy",
    "run_undeploy",
]

ARCHIVE = Path(".flash") / "artifact.tar.gz"


# -- parsers ----------------------------------------------------------------------------------


def add_parser(commands: Any) -> None:
    """Add ``flash deploy`` and its sub-commands to ``flash``'s sub-parsers."""
    deploy = commands.add_parser(
        "deploy",
        help="create environments and send builds to them (flash local or RunPod)",
        description="Environments of a Flash app and the builds they run. The target is "
        "flash local (started if needed) unless --target runpod or FLASH_PROVIDER=runpod.",
    )
    sub = deploy.add_subparsers(dest="deploy_command", metavar="COMMAND", required=True)
    new = sub.add_parser("new", help="create an environment (and the app if needed)")
    new.add_argument("env", help="the environment's name (e.g. production)")
    add_common(new)
    send = sub.add_parser(
        "send", help="upload the build (.flash/artifact.tar.gz) and deploy it"
    )
    send.add_argument("env", help="the environment to deploy to (created if missing)")
    send.add_argument(
        "--archive",
        default=str(ARCHIVE),
        help=f"the build to send (default: {ARCHIVE}, written by `flash build`)",
    )
    send.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the deploy would add, update and remove, and stop (default: off)",
    )
    add_common(send)
    listing = sub.add_parser("list", help="list the app's environments")
    add_common(listing)
    info = sub.add_parser("info", help="show an environment, its build and endpoints")
    info.add_argument("env", help="the environment's name")
    add_common(info)
    delete = sub.add_parser(
        "delete", help="delete an environment and its endpoints (asks twice)"
    )
    delete.add_argument("env", help="the environment's name")
    delete.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="do not ask for confirmation (default: ask twice)",
    )
    add_common(delete)


def add_undeploy_parser(commands: Any) -> None:
    """Add ``flash undeploy list|NAME`` to ``flash``'s sub-parsers."""
    undeploy = commands.add_parser(
        "undeploy",
        help="list or delete deployed endpoints",
        description="`flash undeploy list` lists the deployed endpoints; `flash undeploy "
        "NAME` scales endpoint NAME to zero and deletes it.",
    )
    undeploy.add_argument(
        "name", metavar="list|NAME", help="`list`, or the endpoint's name or id"
    )
    undeploy.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="do not ask for confirmation (default: ask)",
    )
    add_common(undeploy, app=False)


# -- shared lookups ---------------------------------------------------------------------------


async def find_app(
    target: Target, name: str, *, create: bool = False
) -> dict[str, Any]:
    """The app named ``name``; created (saying so) when ``create``, else an error."""
    app = await target.apps.app_by_name(name)
    if app is not None:
        return app
    if not create:
        msg = f"{target.where} has no Flash app named {name!r}"
        hint = "`flash app list` lists the apps; --app-name picks one"
        raise CommandError(msg, hint)
    app = await target.apps.create_app(name)
    say(f"created app {name!r} on {target.where}")
    return app


async def find_environment(
    target: Target, app: dict[str, Any], name: str
) -> dict[str, Any]:
    """The app's environment named ``name``, or an error naming the known ones."""
    env = await target.apps.environment_by_name(app["id"], name)
    if env is not None:
        return env
    known = [e.get("name") for e in await target.apps.list_environments(app["id"])]
    msg = f"app {app['name']!r} has no environment named {name!r}"
    hint = (
        f"known: {', '.join(str(k) for k in known)}"
        if known
        else f"create it with `flash deploy new {name}`"
    )
    raise CommandError(msg, hint)


async def remove_endpoints(target: Target, ids: set[str]) -> list[str]:
    """Scale each endpoint to zero and delete it; returns the names removed."""
    removed = []
    for endpoint in await target.control.find_endpoints():
        if endpoint.get("id") in ids:
            await target.control.scale_to_zero(endpoint)
            await target.control.delete_endpoint(str(endpoint["id"]))
            removed.append(str(endpoint.get("name") or endpoint["id"]))
    return removed


# -- commands ---------------------------------------------------------------------------------


async def create_environment(args: argparse.Namespace) -> int:
    """``flash deploy new ENV`` / ``flash env create ENV``."""
    async with connect(args) as target:
        app = await find_app(target, app_name(args), create=True)
        env = await target.apps.create_environment(app["id"], args.env)
    if args.json:
        print_json({**env, "app": app["name"]})
    else:
        print(
            f"created environment {env['name']!r} in app {app['name']!r} ({env['id']})"
        )
    return 0


async def list_environments(args: argparse.Namespace) -> int:
    """``flash deploy list`` / ``flash env list``."""
    async with connect(args) as target:
        app = await find_app(target, app_name(args))
        envs = await target.apps.list_environments(app["id"])
    if args.json:
        print_json(envs)
        return 0
    print_table(
        f"environments of {app['name']}",
        ("name", "state", "build", "created"),
        [
            (
                e.get("name"),
                e.get("state"),
                short(e.get("activeBuildId")),
                e.get("createdAt"),
            )
            for e in envs
        ],
        f"app {app['name']!r} has no environments; `flash deploy new production` "
        "creates one",
    )
    return 0


async def environment_info(args: argparse.Namespace) -> int:
    """``flash deploy info ENV`` / ``flash env info ENV``."""
    async with connect(args) as target:
        app = await find_app(target, app_name(args))
        env = await find_environment(target, app, args.env)
        env = await target.apps.environment(env["id"])
    endpoints = env.get("endpoints") or []
    if args.json:
        print_json({**env, "app": app["name"]})
        return 0
    print(f"environment {env['name']} ({env['id']})")
    print(f"  app:     {app['name']}")
    print(f"  state:   {env.get('state') or '-'}")
    print(f"  build:   {env.get('activeBuildId') or '- (nothing deployed yet)'}")
    print(f"  created: {env.get('createdAt') or '-'}")
    print_table(
        "endpoints",
        ("name", "id"),
        [(e.get("name"), e.get("id")) for e in endpoints],
        "  endpoints: none running",
    )
    return 0


async def delete_environment(args: argparse.Namespace) -> int:
    """``flash deploy delete ENV`` / ``flash env delete ENV``: asks twice unless --yes."""
    async with connect(args) as target:
        app = await find_app(target, app_name(args))
        env = await find_environment(target, app, args.env)
        ids = {str(e["id"]) for e in env.get("endpoints") or [] if e.get("id")}
        if not args.yes:
            question = (
                f"Delete environment {env['name']!r} of app {app['name']!r} on "
                f"{target.where}, and its {len(ids)} endpoint(s)?"
            )
            confirm_deletion(question, env["name"], "environment")
        with step(f"deleting environment {env['name']}"):
            removed = await remove_endpoints(target, ids)
            await target.apps.delete_environment(env["id"])
    if args.json:
        print_json({"deleted": env["name"], "endpoints": removed})
    else:
        for name in removed:
            print(f"deleted endpoint {name}")
        print(f"deleted environment {env['name']!r} of app {app['name']!r}")
    return 0


def _load_build(archive: Path) -> dict[str, Any]:
    """The build's manifest (beside the archive), or an error saying to build first."""
    if not archive.is_file():
        raise CommandError(
            f"no build to send: {archive} does not exist",
            "run `flash build` first (it writes .flash/artifact.tar.gz)",
        )
    manifest_path = archive.parent / "flash_manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise CommandError(
            f"the build's manifest {manifest_path} cannot be read ({exc})",
            "run `flash build` again",
        ) from exc
    if not isinstance(manifest, dict):
        raise CommandError(
            f"{manifest_path} is not a manifest", "run `flash build` again"
        )
    return manifest


async def send(args: argparse.Namespace) -> int:
    """``flash deploy send ENV``: upload the build, deploy it, reconcile its endpoints."""
    archive = Path(args.archive)
    manifest = await anyio.to_thread.run_sync(_load_build, archive)
    async with connect(args) as target:
        apps = target.apps
        name = app_name(args)
        found = await apps.app_by_name(name)
        env = await apps.environment_by_name(found["id"], args.env) if found else None
        old_manifest = None
        if env is not None and env.get("activeBuildId"):
            old_manifest = (await apps.build(env["activeBuildId"])).get("manifest")
        changes = plan(old_manifest, manifest)
        for action in ("add", "update", "remove", "unchanged"):
            if changes[action]:
                say(f"plan: {action} {', '.join(changes[action])}")
        if args.dry_run:
            if args.json:
                print_json(changes)
            return 0
        app = found or await find_app(target, name, create=True)
        if env is None:
            env = await apps.create_environment(app["id"], args.env)
            say(f"created environment {args.env!r} in app {app['name']!r}")
        with step(f"uploading {archive}") as progress:
            upload = await apps.upload_build(
                app["id"], archive, manifest, progress=progress
            )
        build_id = str(upload.build["id"])
        with step(f"deploying build {short(build_id)} to {env['name']}") as progress:
            await apps.deploy_build(env["id"], build_id)
            done = await reconcile(
                target.control,
                app_name=app["name"],
                environment=env,
                manifest=manifest,
                previous=old_manifest,
                progress=progress,
            )
    if args.json:
        print_json(
            {
                "build": build_id,
                "environment": {"id": env["id"], "name": env["name"]},
                "added": done.added,
                "updated": done.updated,
                "removed": done.removed,
                "unchanged": done.unchanged,
                "endpoints": done.endpoints,
            }
        )
        return 0
    print(
        f"deployed build {build_id} to {env['name']!r} of app {app['name']!r} "
        f"({upload.size / 2**20:.1f} MiB)"
    )
    state = {
        **dict.fromkeys(done.added, "added"),
        **dict.fromkeys(done.updated, "updated"),
        **dict.fromkeys(done.unchanged, "unchanged (left running)"),
    }
    for resource, endpoint in sorted(done.endpoints.items()):
        print(f"  {resource}  {endpoint}  {state.get(resource, '')}")
    for resource in done.removed:
        print(f"  {resource}  removed (the build no longer has it)")
    return 0


def run_deploy(args: argparse.Namespace) -> int:
    """Run ``flash deploy ...``; returns the exit code."""
    commands = {
        "new": create_environment,
        "send": send,
        "list": list_environments,
        "info": environment_info,
        "delete": delete_environment,
    }
    return run(args, commands[args.deploy_command])


# -- undeploy ---------------------------------------------------------------------------------


async def _undeploy(args: argparse.Namespace) -> int:
    async with connect(args) as target:
        endpoints = await target.control.find_endpoints()
        if args.name == "list":
            if args.json:
                print_json(endpoints)
                return 0
            print_table(
                f"endpoints on {target.where}",
                ("name", "id", "workers", "type"),
                [
                    (
                        e.get("name"),
                        e.get("id"),
                        f"{e.get('workersMin', 0)}-{e.get('workersMax', 0)}",
                        e.get("type"),
                    )
                    for e in endpoints
                ],
                f"no endpoints deployed on {target.where}",
            )
            return 0
        name = args.name
        matches = [
            e
            for e in endpoints
            if e.get("id") == name or e.get("name") in (name, f"live-{name}")
        ]
        if not matches:
            known = sorted(str(e.get("name")) for e in endpoints)
            raise CommandError(
                f"no endpoint named {name!r} on {target.where}",
                f"known: {', '.join(known)}" if known else "no endpoints are deployed",
            )
        for endpoint in matches:
            label = f"{endpoint.get('name')} ({endpoint.get('id')})"
            if not args.yes and not confirm(f"Delete endpoint {label}?"):
                raise CommandError(
                    "not deleted: not confirmed", "--yes deletes without asking"
                )
            with step(f"deleting endpoint {label}"):
                await target.control.scale_to_zero(endpoint)
                await target.control.delete_endpoint(str(endpoint["id"]))
    if args.json:
        print_json({"deleted": [e.get("id") for e in matches]})
    else:
        for endpoint in matches:
            print(f"deleted endpoint {endpoint.get('name')} ({endpoint.get('id')})")
    return 0


def run_undeploy(args: argparse.Namespace) -> int:
    """Run ``flash undeploy ...``; returns the exit code."""
    return run(args, _undeploy)
