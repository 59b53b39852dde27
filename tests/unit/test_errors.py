from vmbk.errors import EXIT_MEANINGS, Exit, VmbkError, exit_for_codes
import vmbk.errors as errors


def test_table_matches_vmrestore_section_17():
    assert [int(e) for e in Exit] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 130, 143]
    assert set(EXIT_MEANINGS) == set(Exit)


def test_every_error_class_has_its_own_documented_code():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, VmbkError)]
    assert len(classes) >= 9
    for cls in classes:
        assert cls.code in EXIT_MEANINGS and cls.kind


def test_exit_for_codes():
    assert exit_for_codes([], 0) == Exit.OK
    assert exit_for_codes([], 5) == Exit.OK
    assert exit_for_codes([5], 1) == Exit.PARTIAL
    assert exit_for_codes([5, 5], 0) == Exit.VM
    assert exit_for_codes([5, 4], 0) == Exit.GENERAL
    assert exit_for_codes([77], 0) == Exit.GENERAL
