"""What looks like a secret (`campaign.redaction`): Nylas keys, the values of the secret variables and
random tokens do; the ordinary values of a manifest, a list or a command line never do. And the URL
checks built on it: a ledger's or a store's URL holding a secret is refused without repeating it."""

from __future__ import annotations

import base64
import random
import secrets

import pytest

from campaign.manifest import check_ledger_url, check_store_url
from campaign.manifest._load import ApiSettings, UnsubscribeSettings
from campaign.redaction import (
    DEFAULT_SECRET_ENVS,
    HIDDEN,
    MASK,
    looks_like_secret,
    quote_value,
    scrub_secrets,
    secret_values,
)
from campaign.web import DEFAULT_SECRET_ENV, DEFAULT_WEBHOOK_SECRET_ENV

ORDINARY = [
    # URLs
    "https://api.us.nylas.com",
    "https://api.eu.nylas.com/",
    "https://example.com/unsubscribe?t={{ unsubscribe_token }}",
    "https://example.com/u/{{ unsubscribe_token | urlencode }}?campaign=spring-newsletter-2024",
    "postgresql://campaign@db.example.com:5432/campaigns?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem",
    "postgresql://postgres.abcdefghijklmnopqrst@aws-0-eu-central-1.pooler.supabase.com:6543/postgres",
    "postgresql://u@dpg-abc123def456ghi789-a.oregon-postgres.render.com/campaigns_prod_2024",
    # addresses
    "alice@corp.example.com",
    "Alice Park <alice@corp.example.com>",
    "a.very.long.name+newsletter2024@subdomain.marketing-department.example.co.uk",
    "unsubscribe+spring-newsletter-2024-eu-customers@example.com",
    # paths and file names
    "recipients.csv",
    "/home/user/campaigns/spring-2024/recipients_final_v2.csv",
    "exports/2024-01-15_customers_export_final_v2.csv",
    "report_20240115T093000Z_customers_final.parquet",
    "20240115T093000Z-20240116T093000Z.csv",
    "part-00000-1e4b5c7a-8d9e-4f0a-b1c2-d3e4f5a6b7c8-c000.snappy.parquet",
    "HubSpot_Export_Contacts_2024-06-30_v3_FINAL2.csv",
    "sendgrid_suppression_bounces_20240630_1200.csv",
    "mailchimp_members_export_a1b2c3d4e5_2024.csv",
    "salesforce-report-00O5g000004XyZtEAK-2024.csv",
    "customers_de_at_ch_b2b_q3q4_2024_v12_final_final2.csv",
    "MyCampaignRecipientsListForQ3Of2024InGermany.csv",
    "Q1_2024_Q2_2024_Q3_2024_Q4_2024_all_customers.csv",
    r"C:\Users\Ann\Documents\Campaigns 2024\Spring Newsletter\recipients (final).csv",
    # names, ids, variable names, short values
    "spring-newsletter-2024-eu-customers-v2-final-export",
    "5a1c2f3e-9b8d-4c7a-a6e5-0f1e2d3c4b5a",  # a grant id
    "grant-alice",
    "CAMPAIGN_UNSUBSCRIBE_SECRET_2024_ROTATION_B",
    "NYLAS_API_KEY",
    "BENCH_UNSUBSCRIBE_SECRET",
    "CAMPAIGNUNSUBSCRIBESECRET",  # capitals without '_': a name still reads as words
    "NYLASAPIKEYPRODUCTION2",
    "LINKSIGNINGKEYV2",  # one digit amid capitals, and K, V: a name, not a seed
    "KEYV2SECRETSTAGING",
    "NYLASV3APIKEYPRODUCTION",
    "X7RESENDAPIKEYSTAGING",
    "AWSS3BUCKETSECRETKEY",
    "ACME_NYLAS_KEY_V2_EUROPE_WEST_4",
    "SPRINGNEWSLETTER2024EUROPE",  # a year holds a 0, 1, 8 or 9: not base32
    "Alice Park",
    "Spring news for {{ first_name }}",
    ";",
    "\t",
    "",
]

SECRETS = [
    "nyk_v0_Xq3PwLm9RtZ2KsVb7YhN4CdJ8FgU1oEa6TiW0rQyHs5",  # a Nylas API key
    "nyk_v0_SeCrEt",
    "nyk_test_reconcile_key",
    "Zt4q9XbL2mWv7RcK1pNs8YdF3hJ6gQa0EuTo5LiBk",  # like secrets.token_urlsafe(32)
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",  # secrets.token_hex(32)
    "6B29FC40CA471067B31D00DD010662DA",
    "ghp_1a2B3c4D5e6F7g8H9i0JkLmNoPqRsTuVwXyZ",
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    # base32 (TOTP seeds, as an authenticator's setup shows them): 80, 128 and 160 bits
    "JBSWY3DPEHPK3PXP",
    "P24PC2RDZYTIMXTG",
    "AHVWQBBG3GKG7RLMTVNT5KG5VQ======",
    "GASF2H7NCGGOQPMVJIEW7EIOWE3DJFPO",
    "otpauth://totp/ACME:ann@example.com?secret=JBSWY3DPEHPK3PXP&issuer=ACME",
    # one inside another value: a path, a URL, a quoted message
    "/home/user/nyk_v0_Xq3PwLm9RtZ2KsVb7YhN4CdJ8FgU1oEa6TiW0rQyHs5.csv",
    "https://api.us.nylas.com/?key=Zt4q9XbL2mWv7RcK1pNs8YdF3hJ6gQa0EuTo5LiBk",
]


@pytest.mark.parametrize("value", ORDINARY)
def test_ordinary_values_do_not_look_like_secrets(value):
    assert not looks_like_secret(value)
    assert quote_value(value) == repr(value)
    assert quote_value(value, bare=True) == value


@pytest.mark.parametrize("value", SECRETS)
def test_keys_and_random_tokens_look_like_secrets(value):
    assert looks_like_secret(value)
    assert quote_value(value) == HIDDEN
    assert quote_value(value, bare=True) == HIDDEN


def test_hex_digests_and_urlsafe_tokens_of_every_draw_look_like_secrets():
    for _ in range(200):
        assert looks_like_secret(secrets.token_hex(16))
        assert looks_like_secret(secrets.token_hex(32))
    # A random token reads as no words; now and then one draw happens to (about 1 in 50): most do not.
    found = sum(looks_like_secret(secrets.token_urlsafe(32)) for _ in range(500))
    assert found >= 450


def test_base32_seeds_of_nearly_every_draw_look_like_secrets():
    """TOTP seeds of 160 bits (RFC 4226's recommended length), base32 in capitals. A variable's name
    taken for a secret would be refused, so the rule errs towards names: the seeds it misses are the
    few with two digits or fewer whose letters read as words'."""
    draws = random.Random(4226)
    seeds = [base64.b32encode(draws.randbytes(20)).decode() for _ in range(2_000)]
    missed = [seed for seed in seeds if not looks_like_secret(seed)]
    assert len(missed) == 7
    assert all(sum(char.isdigit() for char in seed) <= 2 for seed in missed)


def test_a_known_secret_is_recognised_whatever_it_looks_like():
    """The value of a secret variable: anywhere in a value when long (unsubscribe secrets are 16+), only
    as the whole value when short, since a short one (a database password) may be an everyday word."""
    known = ("acme-plain-words-api-key-of-ours", "postgres")
    assert not looks_like_secret("acme-plain-words-api-key-of-ours")
    assert looks_like_secret("acme-plain-words-api-key-of-ours", known)
    assert looks_like_secret("/srv/lists/acme-plain-words-api-key-of-ours.csv", known)
    assert looks_like_secret(" postgres ", known)
    assert not looks_like_secret("postgresql://postgres@127.0.0.1/postgres", known)
    assert quote_value("postgres", known) == HIDDEN


def test_the_secret_values_are_read_from_the_variables_named_and_the_defaults():
    environ = {
        "NYLAS_API_KEY": " nyk_v0_abc ",
        "CAMPAIGN_UNSUBSCRIBE_SECRET": "new-secret-0123456789,old-secret-0123456789",
        "ACME_KEY": "acme",
        "HOME": "/home/user",
    }
    found = secret_values(["ACME_KEY", "UNSET_KEY"], environ=environ)
    assert set(found) == {
        "nyk_v0_abc",
        "new-secret-0123456789,old-secret-0123456789",
        "new-secret-0123456789",
        "old-secret-0123456789",
        "acme",
    }
    assert secret_values(environ={}) == ()


def test_the_default_variables_are_those_campaign_reads_secrets_from():
    assert ApiSettings().key_env in DEFAULT_SECRET_ENVS
    assert UnsubscribeSettings.model_fields["secret_env"].default in DEFAULT_SECRET_ENVS
    assert DEFAULT_SECRET_ENV in DEFAULT_SECRET_ENVS
    assert DEFAULT_WEBHOOK_SECRET_ENV in DEFAULT_SECRET_ENVS
    assert "PGPASSWORD" in DEFAULT_SECRET_ENVS


def test_scrubbing_masks_known_secrets_and_nylas_keys_and_nothing_else():
    known = ("test-unsubscribe-secret-0123456789abcdef", "postgres")
    text = (
        "postgresql://postgres@h/db: /srv/test-unsubscribe-secret-0123456789abcdef.csv and "
        "'nyk_v0_Xq3PwLm9RtZ2KsVb7YhN4CdJ8FgU1oEa6TiW0rQyHs5' not found"
    )
    assert scrub_secrets(text, known) == f"postgresql://postgres@h/db: /srv/{MASK}.csv and '{MASK}' not found"
    assert scrub_secrets("recipients.csv: 5 to send", known) == "recipients.csv: 5 to send"


@pytest.mark.parametrize("check", [check_ledger_url, check_store_url])
@pytest.mark.parametrize(
    "url",
    [
        "postgresql://campaign@db.example.com/campaigns",
        "postgres://campaign@db.example.com:5432/campaigns?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem",
        "postgresql://campaign@db.example.com/campaigns?sslkey=/home/ann/.postgresql/client.key&sslcert=c.crt",
        "postgresql://campaign@db.example.com/campaigns?passfile=/home/ann/.pgpass&application_name=spring",
        "postgresql://campaign@5a1c2f3e-9b8d-4c7a-a6e5-0f1e2d3c4b5a.db.example.com/campaigns",
    ],
)
def test_an_ordinary_database_url_is_accepted(check, url):
    assert check(url, known=("test-unsubscribe-secret-0123456789abcdef",)) == url


@pytest.mark.parametrize("check", [check_ledger_url, check_store_url])
@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("sslpassword=hunter2", "holds a secret (its parameter sslpassword)"),
        ("SSLPassword=hunter2", "holds a secret (its parameter sslpassword)"),
        ("oauth_client_secret=hunter2", "holds a secret (its parameter oauth_client_secret)"),
        ("access_token=hunter2", "holds a secret (its parameter access_token)"),
        ("hunter2_token=hunter2", "holds a secret (a parameter)"),
        (
            "sslkey=nyk_v0_Xq3PwLm9RtZ2KsVb7YhN4CdJ8FgU1oEa6TiW0rQyHs5",
            "holds a value that looks like a secret",
        ),
        (
            "application_name=Zt4q9XbL2mWv7RcK1pNs8YdF3hJ6gQa0EuTo5LiBk",
            "holds a value that looks like a secret",
        ),
        (
            "application_name=test-unsubscribe-secret-0123456789abcdef",
            "holds a value that looks like a secret",
        ),
    ],
)
def test_a_database_url_holding_a_secret_is_refused_without_repeating_it(check, query, said):
    url = f"postgresql://campaign@db.example.com/campaigns?{query}"
    with pytest.raises(ValueError, match="must not be written down here") as refused:
        check(url, known=("test-unsubscribe-secret-0123456789abcdef",))
    assert str(refused.value).startswith(said)
    assert query.partition("=")[2] not in str(refused.value)
    assert "hunter2" not in str(refused.value)
