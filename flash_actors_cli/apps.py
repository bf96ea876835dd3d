"""``flash env list|create|info|delete`` and ``flash app list|get|create|delete``.

``flash env`` is runpod-flash's name for what ``flash deploy new|list|info|delete`` do (the
same functions, `flash_actors_cli.deploy`); ``flash app`` lists, shows, creates and deletes
Flash apps (``delete`` removes every environment's endpoints first, as runpod-flash 1.21
does, and asks twice unless ``--yes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flash_actors_cli._target import (
    CommandError,
    add_common,
    confirm_deletion,
    connect,
    print_json,
    print_table,
    run,
    short,
    step,
)
from flash_actors_cli.deploy import (
    create_environment,
    delete_environment,
    environment_info,
    find_app,
    list_environments,
    remove_endpoints,
)

if TYPE_CHECKING:
    import argparse

__all__ = ["add_parsers", "run_app", "run_env"]


def add_parsers(commands: Any) -> None:
    """Add ``flash env`` and ``flash app`` to ``flash``'s sub-parsers."""
    env = commands.add_parser(
        "env",
        help="manage a Flash app's environments",
        description="Environments of a Flash app (the same as `flash deploy "
        "new|list|info|delete`).",
    )
    sub = env.add_subparsers(dest="env_command", metavar="COMMAND", required=True)
    add_common(sub.add_parser("list", help="list the app's environments"))
    for name, text in (
        ("create", "create an environment (and the app if needed)"),
        ("info", "show an environment, its build and endpoints"),
        ("delete", "delete an environment and its endpoints (asks twice)"),
    ):
        parser = sub.add_parser(name, help=text)
        parser.add_argument("env", metavar="NAME", help="the environment's name")
        if name == "delete":
            parser.add_argument(
                "--yes",
                "-y",
                action="store_true",
                help="do not ask for confirmation (default: ask twice)",
            )
        add_common(parser)

    app = commands.add_parser(
        "app",
        help="list, show, create and delete Flash apps",
        description="Flash apps: each has environments and the builds sent to it.",
    )
    sub = app.add_subparsers(dest="app_command", metavar="COMMAND", required=True)
    add_common(sub.add_parser("list", help="list the apps"), app=False)
    get = sub.add_parser("get", help="show an app, its environments and builds")
    get.add_argument("name", help="the app's name")
    add_common(get, app=False)
    create = sub.add_parser("create", help="create an app (with no environments)")
    create.add_argument("name", help="the new app's name")
    add_common(create, app=False)
    delete = sub.add_parser(
        "delete",
        help="delete an app: its environments' endpoints, environments and builds "
        "(asks twice)",
    )
    delete.add_argument("name", help="the app's name")
    delete.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="do not ask for confirmation (default: ask twice)",
    )
    add_common(delete, app=False)


async def _list_apps(args: argparse.Namespace) -> int:
    async with connect(args) as target:
        apps = await target.apps.list_apps()
        where = target.where
    if args.json:
        print_json(apps)
        return 0
    print_table(
        f"apps on {where}",
        ("name", "id", "environments", "builds"),
        [
            (
                a.get("name"),
                a.get("id"),
                ", ".join(str(e.get("name")) for e in a.get("flashEnvironments") or []),
                len(a.get("flashBuilds") or []),
            )
            for a in apps
        ],
        f"no apps on {where}; `flash deploy new production` creates one",
    )
    return 0


async def _get_app(args: argparse.Namespace) -> int:
    async with connect(args) as target:
        app = await find_app(target, args.name)
        envs = await target.apps.list_environments(app["id"])
        builds = await target.apps.list_builds(app["id"])
    if args.json:
        print_json({**app, "flashEnvironments": envs, "flashBuilds": builds})
        return 0
    print(f"app {app['name']} ({app['id']})")
    print_table(
        "environments",
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
        "  environments: none",
    )
    print_table(
        "builds",
        ("id", "created"),
        [(b.get("id"), b.get("createdAt")) for b in builds],
        "  builds: none",
    )
    return 0


async def _create_app(args: argparse.Namespace) -> int:
    async with connect(args) as target:
        app = await target.apps.create_app(args.name)
        where = target.where
    if args.json:
        print_json(app)
    else:
        print(f"created app {app['name']!r} on {where} ({app['id']})")
    return 0


async def _delete_app(args: argparse.Namespace) -> int:
    """``flash app delete NAME``: endpoints first, then the app; asks twice unless --yes."""
    async with connect(args) as target:
        app = await target.apps.app_by_name(args.name)
        if app is None:
            known = sorted(str(a.get("name")) for a in await target.apps.list_apps())
            raise CommandError(
                f"{target.where} has no Flash app named {args.name!r}",
                f"known: {', '.join(known)}" if known else "there are no apps",
            )
        envs = await target.apps.list_environments(app["id"])
        builds = await target.apps.list_builds(app["id"])
        ids: set[str] = set()
        for env in envs:
            endpoints = (await target.apps.environment(env["id"])).get("endpoints")
            ids |= {str(e["id"]) for e in endpoints or [] if e.get("id")}
        if not args.yes:
            question = (
                f"Delete app {app['name']!r} on {target.where}: its {len(envs)} "
                f"environment(s), {len(builds)} build(s) and {len(ids)} endpoint(s)?"
            )
            confirm_deletion(question, app["name"], "app")
        with step(f"deleting app {app['name']}"):
            removed = await remove_endpoints(target, ids)
            await target.apps.delete_app(app["id"])
    if args.json:
        print_json(
            {
                "deleted": app["name"],
                "environments": sorted(str(e.get("name")) for e in envs),
                "builds": len(builds),
                "endpoints": removed,
            }
        )
    else:
        for name in removed:
            print(f"deleted endpoint {name}")
        print(
            f"deleted app {app['name']!r} ({len(envs)} environment(s), "
            f"{len(builds)} build(s))"
        )
    return 0


def run_env(args: argparse.Namespace) -> int:
    """Run ``flash env ...``; returns the exit code."""
    commands = {
        "list": list_environments,
        "create": create_environment,
        "info": environment_info,
        "delete": delete_environment,
    }
    return run(args, commands[args.env_command])


def run_app(args: argparse.Namespace) -> int:
    """Run ``flash app ...``; returns the exit code."""
    commands = {
        "list": _list_apps,
        "get": _get_app,
        "create": _create_app,
        "delete": _delete_app,
    }
    return run(args, commands[args.app_command])
