"""`python manage.py qualtrics_standin`: run the Qualtrics JSON Event trigger stand-in.

The stand-in is for local development and tests and is not Qualtrics.
`integrations.standin` describes its responses and records.
"""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from integrations import standin


class Command(BaseCommand):
    help = (
        "Run a local stand-in for a Qualtrics JSON Event trigger, for development and tests (it is not Qualtrics). "
        "It accepts POST on any path, responds like Qualtrics and can record every request as JSON Lines."
    )
    # The stand-in uses no models or settings, so it starts even while the project's system checks fail.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        standin.add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        """Serve until SIGTERM or Ctrl-C. Raise CommandError when an option is invalid or the port cannot be bound."""
        try:
            server = standin.create_server(options)
        except (ValueError, OSError) as error:
            raise CommandError(f"Cannot start the Qualtrics stand-in: {error}") from error
        standin.attach_stderr_handler()
        standin.serve_until_stopped(server, self._write_line)

    def _write_line(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()
