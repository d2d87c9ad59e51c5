"""The one exception type that means "the user asked for something we cannot do".

`main` turns it into a single line on stderr and a non-zero exit, without a
traceback. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input: an unknown name, a missing path, an impossible setting."""
