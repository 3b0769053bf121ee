# CASA site configuration for this toolkit: fully offline, no network, no auto-updates.
#
# casaconfig executes this file (it is Python) when the CASASITECONFIG environment
# variable holds its absolute path.  The toolkit's modules, tests, Makefile and batch
# wrappers set that variable before the first ``import casatools``; a CASA 6 session
# can use it too:  CASASITECONFIG=$PWD/configs/casasiteconfig.py casa
#
# Measures and reference data come from the pip package ``casadata`` (pinned in
# requirements.lock), so no download is ever needed.  casadata is older than the
# clock, so casatools logs one harmless SEVERE line "Leap second table TAI_UTC seems
# out-of-date"; leap seconds after that table's date are not known to it.
#
# CASA writes its own log to ``logfile``; set CASA_LOGFILE to choose where, otherwise
# it goes to <tmp>/astro-toolkit-casa-logs/ instead of littering the working directory.
import os as _os
import tempfile as _tempfile
import time as _time

import casadata as _casadata

measurespath = _casadata.datapath
datapath = [_casadata.datapath]
measures_auto_update = False
data_auto_update = False
skipnetworkcheck = True
casaconfig_verbose = 0
nologger = True
nogui = True
agg = True


def _default_logfile():
    logdir = _os.path.join(_tempfile.gettempdir(), "astro-toolkit-casa-logs")
    _os.makedirs(logdir, exist_ok=True)
    stamp = _time.strftime("%Y%m%d-%H%M%S", _time.gmtime())
    return _os.path.join(logdir, "casa-%s-%d.log" % (stamp, _os.getpid()))


logfile = _os.environ.get("CASA_LOGFILE") or _default_logfile()
