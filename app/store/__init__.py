"""Where sessions live: one small protocol, with memory, SQLite and Redis behind it."""
