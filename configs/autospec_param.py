# AutoSpec parameter file (the original's param.py format).  autospec reads it without
# executing it: only `NAME = value` lines with plain values (strings, numbers,
# True/False, tuples) are allowed.  Use: python autospec.py --param param.py
# The same keys can go in the [autospec] section of an INI file (configs/autospec.ini).

MODE = 'param'            # 'param': settings below for every object; 'cat': SIZE, REF per object from the catalogue
CATALOG = 'catalogue.txt'     # ID RA DEC [SIZE REF], text/CSV or FITS/ECSV (MUSELET); alias CATALOGUE
DATACUBE = 'cube.fits'    # the IFU data cube (alias CUBE)
REF = ''                  # reference extraction for cross-correlation: an aperture size (in APER) or an image ('' = white light)
DATA_EXT = ()             # data [and variance] extension, e.g. (1, 2) or ('DATA', 'STAT'); () = detect
APER = 1.0, 1.5, 2.0      # aperture radii (arcsec, as mpdaf); at most SIZE / 2
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
SKY_SUB = True            # sky subtraction (see SKY_METHOD)
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
# --- beyond the original (all optional) ---
PREFIX = ''               # product names (PREFIX_WHITE, ...); '' = the cube's INSTRUME (MUSE), else CUBE
OPTIMAL = True            # Horne (1986) optimal extraction with the white-light profile
XCOR_ITER = 2             # cross-correlation passes (2+ = iterate with the last spectrum as reference)
XCOR_MASK = 0.1           # cross-correlation mask: reference-mask spaxels above this fraction of the map's peak
NB_RANGES = ()            # narrow-band images, e.g. ('6550-6580', '4990-5020') in Angstrom
DETECT_THRESH = 1.5       # sep detection threshold (background rms)
DETECT_MINAREA = 5        # sep minimum area (pixels)
DEBLEND_CONT = 0.005      # sep deblending contrast (1.0 = no deblending)
MATCH_RADIUS = 0.5        # arcsec from the catalogue position to the object's segment
SKY_GROW = 0.6            # arcsec kept clear around every segment in the sky mask
SKY_METHOD = 'annulus'    # annulus (median of line-free sky spaxels beyond the object), local (original), global
SKY_WIDTH = 1.5           # arcsec, width of the sky annulus
SKY_MIN = 10              # fewest sky spaxels
SPLIT_SHARED = True       # split a segment shared by several catalogue positions
NB_SEGMENT = ''           # line emitters: 'auto' or a wavelength (A) -> mask on the line's narrow band
NB_WIDTH = 6.0            # A, half-width of that narrow band
PSF = True                # PSF extraction when the cube has FSF keywords
SUMMARY = 'summary'       # summary catalogue (summary.ecsv + summary.csv in OUTPUT)
MARZ = 'marz.fits'        # MARZ input file of the final spectra ('' = none)
