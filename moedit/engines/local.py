"""One process, one device: the engine every other engine must agree with."""

from moedit.engines.base import Engine


class LocalEngine(Engine):
    name = "local"
