"""Tests of autospec's catalogue reader (read_catalogue, catalogue_origin): columns by
header name (mpdaf's real cat.txt), sexagesimal positions, duplicate / non-integer IDs,
per-row SIZE and REF checks, masked tables, the catalogue's origin."""
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import autospec as cat

MPDAF_CAT = (Path(np.__file__).parents[1] / "mpdaf" / "data" / "sdetect" / "cat.txt")


def _write(tmp_path, text, name="cat.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------
# Text catalogues
# ---------------------------------------------------------------------------
def test_mpdaf_cat_txt_in_cat_mode_uses_the_parameters_not_z(tmp_path, caplog):
    """mpdaf's cat.txt (ID RA DEC Z Z_MIN Z_MAX, '--' missing): Z is not read as SIZE."""
    path = shutil.copy(MPDAF_CAT, tmp_path / "cat.txt")
    with caplog.at_level(logging.INFO, logger="autospec"):
        rows = cat.read_catalogue(path, "cat", size=4.0, ref="")
    assert [r.ID for r in rows] == [6, 4, 1, 2, 3, 5, 7, 8]
    assert all(r.SIZE == 4.0 and r.REF == "" and r.ORIGIN == "" for r in rows)
    assert rows[0].RA == pytest.approx(63.3561058) and rows[0].DEC == pytest.approx(10.4661665)
    assert "has no SIZE/REF columns: SIZE/REF come from the parameters" in caplog.text


def test_headered_csv_columns_in_another_order_any_case(tmp_path):
    path = _write(tmp_path, "# my objects\ndec,Ref,id,size,RA_DEG\n"
                            "10.5,white,3,6.0,63.3\n10.6,HST_F606W,4,,63.4\n-1.0,,5,7,10\n")
    rows = cat.read_catalogue(path, "cat", size=5.0, ref="1.5", images=["hst_f606w.fits"])
    assert [(r.ID, r.RA, r.DEC, r.SIZE, r.REF) for r in rows] == [
        (3, 63.3, 10.5, 6.0, "white"), (4, 63.4, 10.6, 5.0, "HST_F606W"),
        (5, 10.0, -1.0, 7.0, "1.5")]   # empty SIZE / REF -> the parameters
    param = cat.read_catalogue(path, "param", size=5.0, ref="")
    assert {(r.SIZE, r.REF) for r in param} == {(5.0, "")}


def test_alpha_delta_aliases_and_comment_header(tmp_path):
    path = _write(tmp_path, "# ID ALPHA DELTA Z\n1 150.1 2.2 0.5\n2 150.2 2.3 --\n")
    rows = cat.read_catalogue(path, "cat", size=3.0)
    assert [(r.ID, r.RA, r.DEC, r.SIZE) for r in rows] == [(1, 150.1, 2.2, 3.0),
                                                           (2, 150.2, 2.3, 3.0)]


def test_headerless_positional_as_before(tmp_path):
    path = _write(tmp_path, "#ID RA DEC SIZE REF\n1 150.1 2.2 6.0 white\n2 150.2 2.3\n"
                            "3, 150.3, 2.4, --, 1.0\n")
    rows = cat.read_catalogue(path, "cat", size=4.0, ref="")
    assert [(r.ID, r.SIZE, r.REF) for r in rows] == [(1, 6.0, "white"), (2, 4.0, ""),
                                                     (3, 4.0, "1.0")]
    with pytest.raises(cat.InputError, match="line 2: expected ID RA DEC"):
        cat.read_catalogue(_write(tmp_path, "1 150.1 2.2\nx y\n", "bad.txt"))


def test_sexagesimal_positions(tmp_path):
    path = _write(tmp_path, "ID RA DEC\n1 04:13:25.5 +10:27:54\n2 04h13m25.5s 10d27m54s\n"
                            "3 63d21m22.5s -00:30:00\n")
    rows = cat.read_catalogue(path)
    assert rows[0].RA == pytest.approx(63.35625) and rows[0].DEC == pytest.approx(10.465)
    assert rows[1].RA == pytest.approx(63.35625) and rows[1].DEC == pytest.approx(10.465)
    assert rows[2].RA == pytest.approx(63.35625) and rows[2].DEC == pytest.approx(-0.5)
    headerless = cat.read_catalogue(_write(tmp_path, "7 04:13:25.5 +10:27:54\n", "h.txt"))
    assert headerless[0].ID == 7 and headerless[0].RA == pytest.approx(63.35625)
    with pytest.raises(cat.InputError, match=r"line 2, column DEC: DEC '\+95:00:00' is not a "
                                             r"declination: give degrees in \[-90, 90\]"):
        cat.read_catalogue(_write(tmp_path, "ID RA DEC\n1 04:13:25.5 +95:00:00\n", "b.txt"))


def test_duplicate_ids_lists_every_id_and_its_lines(tmp_path):
    path = _write(tmp_path, "ID RA DEC\n1 150.1 2.2\n2 150.2 2.2\n1 150.3 2.2\n"
                            "2.0 150.4 2.2\n3 1 1\n")
    with pytest.raises(cat.InputError) as err:
        cat.read_catalogue(path)
    message = str(err.value)
    assert str(path) in message
    assert "duplicate IDs 1 (line 2, line 4); 2 (line 3, line 5)" in message


def test_non_integer_id_names_file_line_column_and_value(tmp_path):
    path = _write(tmp_path, "ID RA DEC\n1 150.1 2.2\n2.7 150.2 2.2\n3.0 150.3 2.2\n")
    with pytest.raises(cat.InputError, match=r"cat.txt, line 3, column ID: ID '2.7' is not an "
                                             r"integer; IDs must be whole numbers"):
        cat.read_catalogue(path)
    assert cat.read_catalogue(_write(tmp_path, "3.0 150.3 2.2\n", "ok.txt"))[0].ID == 3


def test_missing_id_ra_dec_are_errors_all_reported(tmp_path):
    path = _write(tmp_path, "ID,RA,DEC\n1,--,2.2\n,150.2,2.2\n3,150.3,nan\n")
    with pytest.raises(cat.InputError) as err:
        cat.read_catalogue(path)
    message = str(err.value)
    assert "has 3 problems" in message
    assert "line 2, column RA: the RA is missing ('--')" in message
    assert "line 3, column ID: the ID is missing ('')" in message
    assert "line 4, column DEC: the DEC is missing ('nan')" in message


def test_bom_header_and_unreadable_table(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffID,RA,DEC\n1,150.1,2.2\n".encode("utf-8"))
    assert cat.read_catalogue(path)[0].ID == 1
    (tmp_path / "junk.fits").write_bytes(b"not a table")
    with pytest.raises(cat.InputError, match=r"cannot read catalogue .*junk.fits as a table \("
                                             r"[^\n]*\); give a FITS, ECSV or VOTable file"):
        cat.read_catalogue(tmp_path / "junk.fits")


def test_row_with_wrong_number_of_fields_under_a_header(tmp_path):
    path = _write(tmp_path, "ID RA DEC SIZE\n1 150.1 2.2\n")
    with pytest.raises(cat.InputError, match=r"line 2: 3 values, but the header \(line 1\) "
                                             r"names 4 columns \(ID RA DEC SIZE\); write -- "
                                             r"for a missing"):
        cat.read_catalogue(path)
    with pytest.raises(cat.InputError, match=r"line 1 \(the header\): needs columns ID "
                                             r"\(or ID_OBJ\); RA \(or RA_DEG, ALPHA\)"):
        cat.read_catalogue(_write(tmp_path, "ID X Y\n1 2 3\n", "nora.txt"))


# ---------------------------------------------------------------------------
# SIZE and REF checks
# ---------------------------------------------------------------------------
def test_size_zero_in_the_catalogue_and_in_the_parameters(tmp_path):
    path = _write(tmp_path, "ID RA DEC SIZE\n1 150.1 2.2 5\n4 150.2 2.2 0\n")
    with pytest.raises(cat.InputError, match=r"line 3 \(ID 4\), column SIZE: SIZE = 0 arcsec "
                                             r"must be a positive number of arcsec"):
        cat.read_catalogue(path, "cat")
    with pytest.raises(cat.InputError, match=r"the SIZE parameter \(0 arcsec\) must be a positive"):
        cat.read_catalogue(path, "param", size=0.0)
    assert len(cat.read_catalogue(path, "param", size=5.0)) == 2   # SIZE column unused


def test_size_smaller_than_twice_the_aperture_or_three_pixels(tmp_path):
    path = _write(tmp_path, "ID RA DEC SIZE REF\n1 150.1 2.2 5 --\n2 150.2 2.2 3 --\n"
                            "3 150.3 2.2 4.5 2.5\n")
    with pytest.raises(cat.InputError) as err:
        cat.read_catalogue(path, "cat", size=5.0, apertures=[1.0, 2.0])
    message = str(err.value)
    assert ("line 3 (ID 2), column SIZE: SIZE = 3 arcsec is smaller than twice the largest APER "
            "radius (2 arcsec); give SIZE >= 4 arcsec") in message
    assert "line 4 (ID 3), column SIZE: SIZE = 4.5 arcsec is smaller than twice the REF aperture " \
           "radius (2.5 arcsec)" in message
    assert "ID 1" not in message
    with pytest.raises(cat.InputError, match=r"line 3 \(ID 2\), column SIZE: SIZE = 3 arcsec is "
                                             r"smaller than 3 pixels of 1.2 arcsec"):
        cat.read_catalogue(path, "cat", step_arcsec=(0.2, 1.2))
    with pytest.raises(cat.InputError, match=r"the SIZE parameter \(3 arcsec\) is smaller than "
                                             r"twice the largest APER radius"):
        cat.read_catalogue(path, "param", size=3.0, apertures=[2.0])


def test_ref_aperture_in_the_ref_column_checked_against_the_default_size(tmp_path):
    path = _write(tmp_path, "ID RA DEC REF\n1 150.1 2.2 3.0\n")
    with pytest.raises(cat.InputError, match=r"line 2 \(ID 1\), column REF: the SIZE parameter = "
                                             r"5 arcsec is smaller than twice the REF aperture"):
        cat.read_catalogue(path, "cat", size=5.0)


def test_unknown_ref_image_and_white_light_spellings(tmp_path):
    path = _write(tmp_path, "ID RA DEC REF\n1 150.1 2.2 hst_f606w.fits\n2 150.2 2.2 WHITE\n"
                            "3 150.3 2.2 muse_white\n4 150.4 2.2 --\n5 150.5 2.2 HST_F814W\n")
    with pytest.raises(cat.InputError, match=r"line 6 \(ID 5\), column REF: REF 'HST_F814W' names "
                                             r"no IMG image; valid: '' / WHITE / MUSE_WHITE "
                                             r"\(white light\), an aperture radius in arcsec "
                                             r"\(e.g. 1.5\), or an IMG image tag \(HST_F606W\)"):
        cat.read_catalogue(path, "cat", images=["/data/hst_f606w.fits"])
    rows = cat.read_catalogue(path, "cat", images=["hst_f606w.fits", "HST_F814W"])
    assert [r.REF for r in rows] == ["hst_f606w.fits", "WHITE", "muse_white", "", "HST_F814W"]
    with pytest.raises(cat.InputError, match=r"the REF parameter 'OTHER' names no IMG image"):
        cat.read_catalogue(path, "param", ref="OTHER", images=[])
    assert len(cat.read_catalogue(path, "cat")) == 5    # images=None: not checked


# ---------------------------------------------------------------------------
# Tables (FITS / ECSV / VOTable)
# ---------------------------------------------------------------------------
def test_masked_fits_table(tmp_path):
    from astropy.table import MaskedColumn, Table
    table = Table({"id": [1, 2, 3],
                   "RA": MaskedColumn([150.1, 150.2, 150.3], unit="deg"),
                   "DEC": [2.2, 2.3, 2.4],
                   "SIZE": MaskedColumn([6.0, 0.0, 7.0], mask=[False, True, False]),
                   "REF": MaskedColumn(["2.0", "x", ""], mask=[False, True, False])})
    table.write(tmp_path / "cat.fits")
    rows = cat.read_catalogue(tmp_path / "cat.fits", "cat", size=5.0, ref="white")
    assert [(r.ID, r.RA, r.SIZE, r.REF) for r in rows] == [
        (1, 150.1, 6.0, "2.0"), (2, 150.2, 5.0, "white"), (3, 150.3, 7.0, "white")]
    table["RA"].mask = [False, True, False]
    table["id"] = [1.0, 2.5, 1.0]
    table.write(tmp_path / "bad.fits")
    with pytest.raises(cat.InputError) as err:
        cat.read_catalogue(tmp_path / "bad.fits", "cat")
    message = str(err.value)
    assert "row 2, column id: ID 2.5 is not an integer" in message
    assert "row 2, column RA: the RA is missing" in message
    assert "duplicate IDs 1 (row 1, row 3)" in message


def test_ecsv_sexagesimal_strings_and_units(tmp_path):
    from astropy.table import Table
    Table({"ID": ["3", "4"], "RA": ["04:13:25.5", "04h13m25.5s"], "DEC": ["+10:27:54", "10d27m54s"],
           "SIZE": [0.1, 0.2]}).write(tmp_path / "cat.ecsv")
    rows = cat.read_catalogue(tmp_path / "cat.ecsv", "cat")
    assert [r.ID for r in rows] == [3, 4]
    assert rows[1].RA == pytest.approx(63.35625) and rows[1].DEC == pytest.approx(10.465)
    t = Table({"ID": [1], "RA": [4.2237], "DEC": [10.465], "SIZE": [1.0 / 720]})
    t["RA"].unit, t["SIZE"].unit = "hourangle", "deg"
    t.write(tmp_path / "units.ecsv")
    row = cat.read_catalogue(tmp_path / "units.ecsv", "cat")[0]
    assert row.RA == pytest.approx(63.3555) and row.SIZE == pytest.approx(5.0)


def test_votable_and_table_without_ra(tmp_path):
    from astropy.table import Table
    Table({"ID": [1], "RA_DEG": [150.1], "DEC_DEG": [2.2]}).write(tmp_path / "c.vot",
                                                                  format="votable")
    assert cat.read_catalogue(tmp_path / "c.vot")[0].RA == 150.1
    Table({"ID": [1], "X": [1.0]}).write(tmp_path / "c.fits")
    with pytest.raises(cat.InputError, match=r"c.fits: needs columns ID .*; it has ID, X"):
        cat.read_catalogue(tmp_path / "c.fits")


# ---------------------------------------------------------------------------
# ORIGIN
# ---------------------------------------------------------------------------
def test_origin_column_and_catalogue_origin(tmp_path):
    path = _write(tmp_path, "ID RA DEC origin\n1 150.1 2.2 ORIGIN\n2 150.2 2.2 MUSELET\n")
    rows = cat.read_catalogue(path)
    assert [r.ORIGIN for r in rows] == ["ORIGIN", "MUSELET"]
    assert cat.catalogue_origin(rows) == ""            # not common
    from astropy.table import Table
    Table({"ID": [1, 2], "RA": [1.0, 2.0], "DEC": [0.0, 0.0],
           "FROM": ["muselet", "muselet"]}).write(tmp_path / "objects.fit")
    rows = cat.read_catalogue(tmp_path / "objects.fit")   # as mpdaf's muselet objects.fit
    assert cat.catalogue_origin(rows) == "muselet"
    assert cat.catalogue_origin([]) == ""


def test_origin_from_comments_and_fits_header(tmp_path, caplog):
    from astropy.table import Table
    with caplog.at_level(logging.INFO, logger="autospec"):
        rows = cat.read_catalogue(_write(tmp_path, "# MUSELET catalogue\nID RA DEC\n1 150.1 2.2\n"
                                                   "2 150.2 2.2\n"))
    assert [r.ORIGIN for r in rows] == ["MUSELET", "MUSELET"]
    assert cat.catalogue_origin(rows) == "MUSELET" and "comments name MUSELET" in caplog.text
    plain = cat.read_catalogue(_write(tmp_path, "# origin of the data: HST\n1 150.1 2.2\n",
                                      "p.txt"))
    assert plain[0].ORIGIN == ""                       # lower-case 'origin' is not ORIGIN
    header = cat.read_catalogue(_write(tmp_path, "# ID RA DEC ORIGIN\n1 150.1 2.2 --\n", "h.txt"))
    assert header[0].ORIGIN == ""                      # the header comment does not count
    table = Table({"ID": [1, 2], "RA": [1.0, 2.0], "DEC": [0.0, 0.0]})
    table.meta["FROM"] = "ORIGIN"
    table.write(tmp_path / "origin.fits")
    assert cat.catalogue_origin(cat.read_catalogue(tmp_path / "origin.fits")) == "ORIGIN"
    table.meta = {"comments": ["written by MUSELET"]}
    table.write(tmp_path / "muselet.fits")
    assert cat.catalogue_origin(cat.read_catalogue(tmp_path / "muselet.fits")) == "MUSELET"


def test_old_code_can_still_build_rows_positionally():
    row = cat.CatalogueRow(1, 150.0, 2.0, 5.0, "")
    assert row.ORIGIN == ""
