"""The sync wire protocol: a sender streams blocks to a receiver at the other site.

The sender runs the sync engine with a :class:`~siterecovery.wire.client.RemoteDevice`
as its target; the receiver (:mod:`~siterecovery.wire.server`, ``siterecovery
sync-receive``) applies what arrives to its own disk. Every engine writer has
its own connection. Transports: TCP (``tcp://HOST:PORT``) and unix sockets
(``unix:PATH``), see :mod:`~siterecovery.wire.address`.

Frames (both directions), all integers little endian::

    offset size field
         0    4 magic   b"SRW1"
         4    1 kind    HELLO, WELCOME, DATA, ZERO, FLUSH, MARK, DIGESTS, ... (frames.Kind)
         5    1 flags   1 = payload compressed (zstd), 2 = payload sealed (AES-256-GCM)
         6    2 zero
         8    8 seq     frame number of its sender on this connection, from 1
        16    8 offset  disk offset (ACK/NAK: the seq they answer)
        24    8 length  logical bytes covered (DATA: the chunk's length)
        32    4 size    payload bytes that follow the header
        36    4 hcheck  xxh3-64 of bytes 0-35, low 32 bits: the header is intact
        40    8 pcheck  xxh3-64 of the payload as sent: the payload is intact
        48      payload

Verification on arrival: a bad ``hcheck`` loses the framing, so the receiver
answers ERROR and closes; the sender reconnects and sends the request again
(every request is idempotent). A bad ``pcheck`` is answered with NAK and the
sender resends the same bytes. A corrupt reply makes the sender resend its
request; the receiver recognises the repeated ``seq`` and resends its last
reply without applying anything twice.

Exchanges are request/reply, one at a time per connection (parallelism comes
from one connection per writer):

* HELLO (JSON: version, size, job, key fingerprint, client random) →
  WELCOME (JSON: size, created, resume offset of ``job``, server random,
  key proof) or ERROR (JSON error document).
* DATA (payload: a segment table ``<I count`` + ``count × <IIB (start,
  length, zero)`` relative to ``offset``, then the data segments in order) → ACK
* ZERO (offset, length) → ACK;  FLUSH → ACK;  MARK (offset: a checkpoint,
  remembered for ``job`` so a later sender resumes there) → ACK;  DONE → ACK
* DIGESTS (offset, length; JSON: block_size, threads) → DIGEST_LIST
  (``<Q`` bytes hashed, then 16-byte xxh3-128 digests): the receiver hashes
  its own disk, only digests cross;  DISK_DIGEST → JSON ``{"digest"}``
* EXTENTS (offset, length) → JSON ``[[start, length, zero], ...]``;
  READ (offset, length) → DATA (the bytes)

Optional stages, per payload: zstd (``compress``: kept only when smaller),
then AES-256-GCM with per-connection keys derived by HKDF-SHA256 from the
named key and both randoms, one key per direction, nonce = ``seq``, the
header's first 36 bytes as associated data. With a key every frame after
HELLO is sealed, so nothing, not even a ZERO, can be forged or replayed.
"""
