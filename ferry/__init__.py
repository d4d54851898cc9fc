"""The Ferry application: the `ferry` command, `ferry demo` and its sample site.

It sits above the services and imports them; `shared/` and `services/` never import it.
"""
