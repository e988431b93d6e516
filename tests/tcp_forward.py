"""A TCP forwarder for the tests (``python tcp_forward.py LISTEN_PORT:TARGET_PORT ...``, all on
127.0.0.1): it stands between the node and a destination, so that the destination can be "down"
(the forwarder not yet started: connections refused) and come back without restarting the PACS."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _serve(listen: int, target: int) -> None:
    server = socket.create_server(("127.0.0.1", listen))
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", target))
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


if __name__ == "__main__":
    threads = []
    for pair in sys.argv[1:]:
        listen, target = (int(p) for p in pair.split(":"))
        threads.append(threading.Thread(target=_serve, args=(listen, target), daemon=True))
        threads[-1].start()
    print("forwarding", flush=True)
    for thread in threads:
        thread.join()
