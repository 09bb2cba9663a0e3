"""`python manage.py demo`: run the whole portal locally and push the demo batches through it.

See `integrations.demo` for the steps. Development only: it needs
PORTAL_ALLOW_LOOPBACK_TARGETS=1 and creates the superuser admin / admin.
"""

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from integrations import demo


class Command(BaseCommand):
    help = (
        "Run the portal on this machine with a Qualtrics stand-in (web server, Celery worker and beat), "
        "seed demo feeds and connections, POST the batches in demo/batches/ and print what was delivered. "
        "Development only."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=8000, help="Port of the web server (default: %(default)s).")
        parser.add_argument(
            "--standin-port", type=int, default=0, help="Port of the Qualtrics stand-in; 0 picks a free one."
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=120.0,
            help="Seconds to wait for routing and delivery before failing (default: %(default)s).",
        )
        parser.add_argument(
            "--var-dir",
            type=Path,
            default=demo.DEFAULT_VAR_DIR,
            help="Folder for logs, the stand-in's record file and beat's schedule (default: var/demo).",
        )
        parser.add_argument(
            "--no-seed",
            action="store_true",
            help="Only start the services: no feeds, connections or batches.",
        )
        parser.add_argument(
            "--showcase-settings",
            action="store_true",
            help="Also seed one connection per mParticle setting and print what each changed in the bodies sent.",
        )
        ending = parser.add_mutually_exclusive_group()
        ending.add_argument(
            "--stop-after-summary", action="store_true", help="Stop everything after printing the summary."
        )
        ending.add_argument(
            "--keep-running",
            action="store_true",
            help="Keep everything running until Ctrl-C or SIGTERM (the default).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Run the demo; exit with status 1 when a step failed or timed out."""
        settings = demo.DemoOptions(
            port=options["port"],
            standin_port=options["standin_port"],
            timeout=options["timeout"],
            var_dir=options["var_dir"].resolve(),
            seed=not options["no_seed"],
            stop_after_summary=options["stop_after_summary"],
            showcase_settings=options["showcase_settings"],
        )
        try:
            succeeded = demo.run(settings, self._write)
        except demo.DemoError as error:
            raise CommandError(str(error), returncode=1) from error
        if not succeeded:
            raise CommandError("The demo did not complete; see the lines above.", returncode=1)

    def _write(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()
