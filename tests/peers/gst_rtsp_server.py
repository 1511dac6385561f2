#!/usr/bin/python3
"""GStreamer's RTSP server as a real peer for the interop test.

usage: gst_rtsp_server.py BIND_ADDR PORT [file.wav]
serves rtsp://BIND_ADDR:PORT/rtsp.wav as RTP L16 mono 8 kHz, payload type 96 (a 440 Hz tone
when no file is given). Prints one line when it serves. Run it with Debian's /usr/bin/python3,
which sees python3-gi.
"""
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

Gst.init(None)
addr, port = sys.argv[1], sys.argv[2]
caps = "audio/x-raw,format=S16BE,rate=8000,channels=1"
if len(sys.argv) > 3:
    src = f"filesrc location={sys.argv[3]} ! wavparse ! audioconvert ! audioresample"
else:
    src = "audiotestsrc is-live=true wave=sine freq=440"
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(f"( {src} ! {caps} ! rtpL16pay name=pay0 pt=96 )")
factory.set_shared(True)
server = GstRtspServer.RTSPServer()
server.set_address(addr)
server.set_service(str(port))
server.get_mount_points().add_factory("/rtsp.wav", factory)
if server.attach(None) == 0:
    sys.exit("attach failed")
print(f"serving rtsp://{addr}:{port}/rtsp.wav", flush=True)
GLib.MainLoop().run()
