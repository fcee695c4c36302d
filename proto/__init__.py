"""pacsnode.proto: the peer protocol (pacsnode.proto) and the code generated from it.

The generated modules are `pacsnode_pb2` (messages), `pacsnode_pb2_grpc` (service stubs
and servicers) and `pacsnode_pb2.pyi` (type stubs); `generate.py` writes them. They are
not imported here, so the generator works even when they are stale or missing.

The constants below are part of the protocol, beside the .proto (which cannot hold
constants); proto/README.md describes the rules they take part in.
"""

# The version in every Envelope. Bump it for a change an older node cannot safely
# ignore; receivers refuse a newer version with a clear error.
PROTOCOL_VERSION = 1

# The largest payload in one StoreChunk or FetchChunk (1 MiB): well under gRPC's default
# 4 MiB message limit, with room for the header of the first chunk.
CHUNK_BYTES_MAX = 1 << 20

# The largest payload sent in one Data.StoreWholeInstance message (4 MiB); larger ones
# are streamed with Data.StoreInstance. With its header it stays under the peer port's
# 8 MiB message limit (node/peer_server.py MESSAGE_BYTES_MAX).
WHOLE_INSTANCE_BYTES_MAX = 4 << 20

# The most Data.StoreStream requests a receiver stores at once on one stream; it reads no
# more of that stream until one is answered (HTTP/2 flow control then holds the sender).
STORE_STREAM_IN_FLIGHT_MAX = 32

# The most frame numbers one Data.FetchFrames request may ask for; a longer WADO-RS frame
# list is read through FetchInstance.
FRAMES_ASKED_MAX = 4096

# Buckets per token range in RangeDigest (XOR + count each).
DIGEST_BUCKET_COUNT = 1024
