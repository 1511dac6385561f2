#!/usr/bin/python3
"""GStreamer's RTSP server offering multicast only, a real peer for the multicast test.

usage: gst_rtsp_multicast_server.py BIND_ADDR PORT FILE.wav FIRST_GROUP LAST_GROUP MIN_PORT MAX_PORT TTL
serves rtsp://BIND_ADDR:PORT/rtsp.wav as RTP L16 mono 8 kHz, payload type 96, to a group from
the address pool FIRST_GROUP..LAST_GROUP with ports MIN_PORT..MAX_PORT and TTL; a SETUP reply is
`RTP/AVP;multicast;destination=G;ttl=TTL;port=P-P+1`. The host needs a multicast route (the
test adds 224.0.0.0/4 on its interface). Prints one line when it serves. Run it with Debian's
/usr/bin/python3, which sees python3-gi.
"""
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402

Gst.init(None)
addr, port, wav, first, last, min_port, max_port, ttl = sys.argv[1:9]
caps = "audio/x-raw,format=S16BE,rate=8000,channels=1"
src = f"filesrc location={wav} ! wavparse ! audioconvert ! audioresample"
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(f"( {src} ! {caps} ! rtpL16pay name=pay0 pt=96 )")
factory.set_shared(True)
factory.set_protocols(GstRtsp.RTSPLowerTrans.UDP_MCAST)
pool = GstRtspServer.RTSPAddressPool()
if not pool.add_range(first, last, int(min_port), int(max_port), int(ttl)):
    sys.exit("address pool range refused")
factory.set_address_pool(pool)
server = GstRtspServer.RTSPServer()
server.set_address(addr)
server.set_service(str(port))
server.get_mount_points().add_factory("/rtsp.wav", factory)
if server.attach(None) == 0:
    sys.exit("attach failed")
print(f"serving rtsp://{addr}:{port}/rtsp.wav (multicast {first}-{last})", flush=True)
GLib.MainLoop().run()
