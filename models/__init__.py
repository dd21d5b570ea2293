"""The bottom layer of orgsync: settings, engine and sessions, tables, mirror writes and reads."""
