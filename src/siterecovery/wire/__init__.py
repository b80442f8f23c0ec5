"""The sync wire protocol: a sender streams blocks to a receiver at the other site.

The sender runs the sync engine with a :class:`~siterecovery.wire.client.RemoteDevice`
as its target; the receiver (:mod:`~siterecovery.wire.server`: a
``WireServer`` of many transfers chosen by ticket, or a ``Receiver`` of one,
``siterecovery sync-receive``) applies what arrives to its own disk. Every
engine writer has its own connection. Transports: TCP (``tcp://HOST:PORT``)
and unix sockets (``unix:PATH``), see :mod:`~siterecovery.wire.address`;
optionally inside TLS (below).

Frames (both directions), all integers little endian::

    offset size field
         0    4 magic   b"SRW1"
         4    1 kind    HELLO, WELCOME, DATA, ZERO, FLUSH, MARK, DIGESTS, ... (frames.Kind)
         5    1 flags   1 = payload compressed (zstd), 2 = payload sealed (AES-256-GCM)
         6    2 zero
         8    8 seq     frame number of its sender on this connection, from 1, +1 per new frame
        16    8 offset  disk offset (ACK/NAK/ERROR: the seq they answer, 0 = none)
        24    8 length  logical bytes covered (DATA: the chunk's length)
        32    4 size    payload bytes that follow the header
        36    4 hcheck  xxh3-64 of bytes 0-35, low 32 bits: the header is intact
        40    8 pcheck  xxh3-64 of the payload as sent: the payload is intact
        48      payload

Requests and their answers (protocol version 2):

* HELLO (JSON: version, size, job, key fingerprint, client random, ``ticket``
  (a string, or null for a single-target receiver), ``stream`` (random hex,
  the same on every reconnection of one sending device)) → WELCOME (JSON:
  size, created, resume offset of ``job``, server random, key proof) or
  ERROR (JSON error document). An unknown or absent ticket is answered
  ERROR ``AGENT_UNAUTHORIZED`` and the connection closed, before any disk
  is opened; tickets are compared in constant time.
* DATA (payload: a segment table ``<I count`` + ``count × <IIB (start,
  length, zero)`` relative to ``offset``, then the data segments in order) → ACK
* ZERO (offset, length) → ACK;  FLUSH → ACK;  MARK (offset: a checkpoint,
  remembered for ``job`` so a later sender resumes there) → ACK;  DONE → ACK
* DIGESTS (offset, length; JSON: block_size, threads) → DIGEST_LIST
  (``<Q`` bytes hashed, then 16-byte xxh3-128 digests): the receiver hashes
  its own disk, only digests cross;  DISK_DIGEST → JSON ``{"digest"}``
* EXTENTS (offset, length) → JSON ``[[start, length, zero], ...]``;
  READ (offset, length) → DATA (the bytes)
* Any request may be answered ERROR (its ``offset`` = the request's seq),
  carrying the error document; the session goes on.

The window. DATA and ZERO are *windowed*: the sender does not wait for their
ACK, up to ``window`` frames (default 32) and ``window`` MiB of data in
flight per connection (one frame larger than that goes alone). Every other
request is sent only when no frame is in flight (on any connection of the
same sending device), and is the only frame in flight until answered: so
FLUSH and MARK mean "everything before is applied" (and, for FLUSH,
durable). The receiver handles frames strictly in order; with ``expected``
the seq after the last one applied:

1. seq = expected, intact: apply it, answer it (ACK N means: every frame up
   to N is applied), expected + 1.
2. seq < expected (sent again, damaged or not): answer again without
   applying: the last answer byte for byte if seq = expected − 1, else ACK seq.
3. seq = expected, payload damaged (``pcheck``): NAK seq, and *discard*:
4. seq > expected while discarding (damaged or not): drop it, no answer;
   the sender sends it again. Discarding ends when ``expected`` arrives
   intact (rule 1). seq > expected otherwise: ERROR, hang up.
5. A damaged header (``hcheck``, magic, size) loses the framing: hang up.

The sender, on NAK N: everything before N is applied; it resends N and
every later unanswered frame, in order, under the same seq (go-back-N); the
same bytes again (compression and sealing are deterministic). On a damaged
answer it goes back from its oldest unanswered frame. Answers about frames
older than its oldest unanswered one are stale and ignored. After
:data:`~siterecovery.wire.client.ATTEMPTS` sends of one frame it gives up.

Resumption. When a connection breaks (or after a damaged header), the
sender reconnects with backoff (bounded tries) and sends every unanswered
frame again, in order, under new numbers: DATA and ZERO carry absolute
offsets, every request is idempotent, so no pass restarts and at most one
window per connection crosses twice. The receiver welcomes a HELLO only
after the earlier session of the same ``stream`` has ended (it hangs up on
it and waits), so no frame of the old connection is applied after one of
the new.

Optional stages, per payload: zstd (``compress``: kept only when smaller),
then AES-256-GCM with per-connection keys derived by HKDF-SHA256 from the
named key and both randoms, one key per direction, nonce = ``seq``, the
header's first 36 bytes as associated data. With a key every frame after
HELLO is sealed, so nothing, not even a ZERO, can be forged or replayed; a
frame sent again under the same seq has the same plaintext, so a repeated
nonce reveals nothing but the repetition.

TLS (both ends optional, both or neither): the whole stream, HELLO
included, inside TLS 1.2+. The receiver presents its agent certificate
(``agent.tls.server_context``); the sender trusts exactly the one
certificate it pinned (``agent.tls.client_context``) and refuses any other
with a WireError. TLS hides and authenticates the stream without a named
key; a key adds end-to-end sealing of the payloads on top.
"""
