"""The drivers: compile, verify, profile, bench, audit, variants and export, each a function that
runs the stages (frontend -> passes -> backends -> bundle) for one job. The CLI and the public API
call them; nothing below them imports them.
"""
