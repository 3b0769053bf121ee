# AutoSpec parameter file (the original's param.py format).  autospec reads it without
# executing it: only `NAME = value` lines with plain values (strings, numbers,
# True/False, tuples) are allowed.  Use: python autospec.py --param param.py
# The same keys can go in the [autospec] section of an INI file (configs/autospec.ini).

MODE = 'param'            # 'param': settings below for every object; 'cat': SIZE, REF per object from the catalogue
CATALOGUE = 'catalogue.txt'   # ID RA DEC [SIZE REF], text or CSV
CUBE = 'cube.fits'        # the IFU data cube
REF = ''                  # reference extraction for cross-correlation: an aperture size (in APER) or an image ('' = white light)
DATA_EXT = ()             # data [and variance] extension, e.g. (1, 2) or ('DATA', 'STAT'); () = detect
APER = 1.0, 1.5, 2.0      # aperture diameters (arcsec); at most SIZE / 2
IMG = ()                  # additional images to weight extractions and build masks, e.g. ('hst_f606w.fits',)
USE_IMGS = True           # use the IMG images when building the object and sky masks
OBJ_MASK = 'intersection' # 'intersection' or 'union' of the segmentation maps (empty intersection -> union)
SEG = ()                  # user segmentation maps on the cube's grid
OUTPUT = 'autospec_output'    # output directory
PRE_OUT = 'autospec_'     # prefix of the output Source files (followed by the ID)
SIZE = 5.0                # full width of sub-cubes and stamps (arcsec)
XCOR = True               # cross-correlation extraction
CONT_SUB = True           # polynomial continuum subtraction (with XCOR)
CONT_POLY = 5             # polynomial order of the continuum
PLOTS = True              # ID_IMAGES, ID_MASKS, ID_SPECTRA, ID_XCOR .jpg plots per object
OUT_SUB = False           # keep sub-cubes in the Source files (large)
OUT_IMG = True
OUT_SEG = True
OUT_MASK = True
OUT_XCOR = True
OUT_SPEC = True
CMAP = 'viridis'          # matplotlib colour map
ORIG_FROM = ''            # origin of the detections (Source headers)
ORIG_FROMV = ''
ORIG_CUBE = ''
ORIG_CUBEV = ''
WARNINGS = False          # show astropy/mpdaf warnings
