"""One process, one device: the engine every other engine must agree with."""

from moedit.engines.base import Engine


class LocalEngine(Engine):
    name = "local"
    graph_capturable = True  # train.cuda_graph: one process's whole step can be captured
