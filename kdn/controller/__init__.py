"""The controller (control plane only, never payload bytes): the gRPC servicer (``servicer``), the global index
(``index``), cost-driven placement (``placement``), the codec profile store (``profile_store``) and the calls it
makes to nodes (``node_link``)."""
