# The C extension of src/wshub/_runpack.c (see wshub.history).

# (blob, ends, flags): a run of payloads packed for History.keep_run.
def pack(payloads: list[bytes], messages: list[bool], /) -> tuple[bytes, bytes, bytes]: ...
