"""Generated protobuf/gRPC stubs of the ``kdn.v1`` wire protocol (``proto/kdn/v1``). Do not edit: run
``scripts/gen_proto.sh``."""
