"""User-facing errors: one line that names the file, line or field and says what to do."""


class ZerotuneError(Exception):
    """An error the user can fix. The CLI prints it on one line and exits with status 2."""


class ConfigError(ZerotuneError):
    """A config key, flag or override that does not fit the schema."""


class DataError(ZerotuneError):
    """A data file or record that cannot be used."""
