"""Parsing manage-bde output (the guest side is Windows; the text is what it prints)."""

from vmbk.backup.bitlocker import RecoveryKey, protected_volumes, recovery_keys

STATUS = """BitLocker Drive Encryption: Configuration Tool version 10.0.19041
Copyright (C) 2013 Microsoft Corporation. All rights reserved.

Disk volumes that can be protected with
BitLocker Drive Encryption:
Volume C: [OS]
[OS Volume]

    Size:                 237.84 GB
    BitLocker Version:    2.0
    Conversion Status:    Used Space Only Encrypted
    Percentage Encrypted: 100.0%
    Encryption Method:    XTS-AES 128
    Protection Status:    Protection On
    Lock Status:          Unlocked
    Identification Field: Unknown
    Key Protectors:
        TPM
        Numerical Password

Volume D: [Data]
[Data Volume]

    Size:                 100.00 GB
    Conversion Status:    Fully Decrypted
    Protection Status:    Protection Off

Volume E: [Backup]
[Data Volume]

    Protection Status:    Protection On
"""

PROTECTORS = """BitLocker Drive Encryption: Configuration Tool version 10.0.19041
Copyright (C) 2013 Microsoft Corporation. All rights reserved.

Volume C: [OS]
All Key Protectors

    TPM:
      ID: {8C2F9E0B-1111-2222-3333-444455556666}
      PCR Validation Profile:
        7, 11
        (Uses Secure Boot for integrity validation)

    Numerical Password:
      ID: {4A7C3D2E-AAAA-BBBB-CCCC-DDDDEEEEFFFF}
      Password:
        123456-234567-345678-456789-567890-678901-789012-890123
      Backup type:
        Active Directory

    Numerical Password:
      ID: {00000000-AAAA-BBBB-CCCC-000000000001}
      Password:
        111111-222222-333333-444444-555555-666666-777777-888888
"""


def test_volumes_with_protection_on():
    assert protected_volumes(STATUS) == ["C:", "E:"]
    assert protected_volumes("") == []
    assert protected_volumes(STATUS.replace("Protection On", "Protection Off")) == []


def test_recovery_passwords_with_their_protector_ids():
    assert recovery_keys("C:", PROTECTORS) == [
        RecoveryKey("C:", "{4A7C3D2E-AAAA-BBBB-CCCC-DDDDEEEEFFFF}",
                    "123456-234567-345678-456789-567890-678901-789012-890123"),
        RecoveryKey("C:", "{00000000-AAAA-BBBB-CCCC-000000000001}",
                    "111111-222222-333333-444444-555555-666666-777777-888888"),
    ]


def test_a_tpm_only_volume_has_no_recovery_password():
    tpm_only = PROTECTORS.split("    Numerical Password:")[0]
    assert recovery_keys("C:", tpm_only) == []
