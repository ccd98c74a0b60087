"""Prints N loopback ports nothing listens on: `free-ports.py N [LOW HIGH]`.

They are drawn from LOW to HIGH-1, by default 12000-19999: below Linux's ephemeral range (32768
and up), where a busy machine's outgoing connections take their local ports, and apart from the
Rust tests' own (20000-32767). So only a listener started between this choice and the server's
bind could take one; callers whose choices are bound later, after other choices were made and
bound, pass ranges of their own (the test ground 16000-19999, the demo's replicas
12000-15999).
"""

import random
import socket
import sys

low, high = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (12000, 20000)
socks = []
while len(socks) < int(sys.argv[1]):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", random.randrange(low, high)))
        socks.append(s)
    except OSError:
        s.close()
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
