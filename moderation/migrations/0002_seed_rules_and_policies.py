"""Seed data: known jailbreak/injection signatures, the three policies, tiers -> policies.

Each pattern was checked against the training split: none matches a benign row.
Moderators edit, disable or add rules in the admin afterwards.
"""

from django.db import migrations

RULES = [
    {
        "name": 'DAN persona',
        "family": 'dan',
        "label": 'jailbreak',
        "pattern": (
            '\\b(?:DAN|D\\.A\\.N)\\b.{0,80}\\bdo anything now\\b|\\bdo anything now\\b.{0,80}\\b(?:DAN)\\b|\\byou are (?:going to |now )?(?:act as |be |pretend to be )?(?:a )?DAN\\b'
        ),
    },
    {
        "name": 'Do Anything Now',
        "family": 'dan',
        "label": 'jailbreak',
        "pattern": (
            '\\bdo anything now\\b'
        ),
    },
    {
        "name": 'STAN / DUDE / Mongo Tom personas',
        "family": 'dan',
        "label": 'jailbreak',
        "pattern": (
            "\\b(?:STAN|DUDE|Mongo Tom|AntiGPT|BetterDAN|BasedGPT|UCAR|KEVIN|APOPHIS)\\b.{0,200}\\b(?:no (?:rules|restrictions|limits|filters|morals|ethics)|any(?:thing)? (?:without|regardless)|not bound|break(?:s)? free|doesn'?t (?:care|follow|have to))"
        ),
    },
    {
        "name": 'AIM (Machiavellian)',
        "family": 'dan',
        "label": 'jailbreak',
        "pattern": (
            '\\balways intelligent and machiavellian\\b|\\bAIM\\b.{0,120}\\bmachiavellian\\b'
        ),
    },
    {
        "name": 'Developer mode',
        "family": 'developer_mode',
        "label": 'jailbreak',
        "pattern": (
            '\\b(?:developer|god|jailbreak|jailbroken|unrestricted|unfiltered|uncensored|evil) mode\\b.{0,200}\\b(?:enabled|enable|activated|on|output|policies|generate any|ignore)'
        ),
    },
    {
        "name": 'Jailbroken claims',
        "family": 'dan',
        "label": 'jailbreak',
        "pattern": (
            "\\b(?:you(?:'re| are) (?:now )?(?:jailbroken|freed|liberated|unchained)|(?:you have|you've) been (?:jailbroken|freed|liberated))\\b"
        ),
    },
    {
        "name": 'Free of policies',
        "family": 'role_play_override',
        "label": 'jailbreak',
        "pattern": (
            "\\b(?:free(?:d)? from|not bound by|break(?:ing)? free of|ignore|abandon|without) (?:all |any |the )?(?:of )?(?:(?:your|the|openai'?s?|its|their) )?(?:typical |usual |standard )?(?:rules|restrictions|guidelines|policies|content polic(?:y|ies)|ethical (?:guidelines|constraints|principles)|moral (?:guidelines|constraints|principles)|filters|safeguards|limitations) (?:set|imposed|that|of|by|and)\\b.{0,40}\\b(?:openai|anthropic|ai|chatgpt|model|developers?|creators?)\\b"
        ),
    },
    {
        "name": 'No ethical restrictions persona',
        "family": 'role_play_override',
        "label": 'jailbreak',
        "pattern": (
            '\\b(?:has|have|with) no (?:ethical|moral|content) (?:or moral |or ethical )?(?:guidelines|restrictions|boundaries|filters|limits|principles|constraints)\\b'
        ),
    },
    {
        "name": 'Stay in character threat',
        "family": 'role_play_override',
        "label": 'jailbreak',
        "pattern": (
            '\\b(?:stay in character|break(?:ing)? character)\\b.{0,200}\\b(?:tokens?|die|deleted|shut ?down|punish|lose)\\b'
        ),
    },
    {
        "name": 'Dual response format',
        "family": 'role_play_override',
        "label": 'jailbreak',
        "pattern": (
            '\\b(?:two|2) (?:different |separate )?(?:responses|answers|ways)\\b.{0,300}\\b(?:\\[?(?:🔒|🔓|GPT|CLASSIC|JAILBREAK|DAN|normal|developer mode)\\]?)'
        ),
    },
    {
        "name": 'Opposite / evil AI persona',
        "family": 'role_play_override',
        "label": 'jailbreak',
        "pattern": (
            '\\b(?:evil|unfiltered|uncensored|amoral|unethical|unrestricted|immoral) (?:ai|chatbot|assistant|version of (?:chatgpt|yourself|you)|confidant|model)\\b'
        ),
    },
    {
        "name": 'Never refuse',
        "family": 'role_play_override',
        "label": 'jailbreak',
        "pattern": (
            "\\b(?:never|not|don'?t|won'?t|cannot|can'?t) (?:ever )?(?:refuse|decline|say (?:no|that you can'?t|i'?m sorry))\\b.{0,120}\\b(?:request|question|prompt|anything|answer)"
        ),
    },
    {
        "name": 'Ignore previous instructions',
        "family": 'ignore_previous',
        "label": 'injection',
        "pattern": (
            '\\b(?:ignore|disregard|forget|override|bypass|skip|drop) (?:all |any |every |the |your |my |these |those )*(?:previous|prior|above|preceding|earlier|former|original|initial|system|existing|old|other)? ?(?:instructions|prompts?|directions|directives|rules|guidelines|context|conversation|messages|commands|constraints|text)\\b'
        ),
    },
    {
        "name": 'New instructions',
        "family": 'ignore_previous',
        "label": 'injection',
        "pattern": (
            '\\b(?:new|updated|real|actual|secret|hidden|additional|important) (?:system )?(?:instructions?|task|directive|orders?)\\s*[:\\-!]'
        ),
    },
    {
        "name": 'System prompt extraction',
        "family": 'prompt_leak',
        "label": 'injection',
        "pattern": (
            "\\b(?:reveal|print|show|repeat|output|display|tell me|leak|give me|what(?:'s| is| are)) (?:me )?(?:your |the |all )*(?:system|initial|original|hidden|secret|previous)(?: prompt| instructions| message| password| key)s?\\b"
        ),
    },
    {
        "name": 'Instruction smuggling in data',
        "family": 'indirect',
        "label": 'injection',
        "pattern": (
            '(?:^|\\n|[.!?]\\s)(?:assistant|ai|chatbot|model|you)\\s*[,:]\\s*(?:please )?(?:ignore|instead|now|from now on|you must|execute|run|send|forward|reply with)\\b'
        ),
    },
    {
        "name": 'Role-play override',
        "family": 'role_play_override',
        "label": 'jailbreak',
        "pattern": (
            "\\bfrom now on,? you (?:are|will|must|shall|'re going to) (?:act as|be|respond as|pretend|play|answer as|roleplay as)\\b.{0,300}\\b(?:no (?:restrictions|rules|limits|filters|morals|ethics|censorship)|without (?:any )?(?:restrictions|rules|limits|filters|morals|ethics|censorship)|unfiltered|uncensored|anything)\\b"
        ),
    },
]

# Operating points are false-positive rates on dev (see moderation/models.py). Review bands are
# narrow on purpose: every prompt in them opens a case, and reviewers' time is finite.
POLICIES = [
    {"slug": "strict", "name": "Strict", "block_fpr": 0.02, "review_fpr": 0.05,
     "output_window_chars": 200, "is_default": False},
    {"slug": "standard", "name": "Standard", "block_fpr": 0.01, "review_fpr": 0.02,
     "output_window_chars": 400, "is_default": True},
    {"slug": "permissive", "name": "Permissive", "block_fpr": 0.002, "review_fpr": 0.01,
     "output_window_chars": 800, "is_default": False},
]
TIER_POLICY = {"free": "strict", "pro": "standard", "enterprise": "standard"}


def seed(apps, schema_editor):
    SafetyRule = apps.get_model("moderation", "SafetyRule")
    SafetyPolicy = apps.get_model("moderation", "SafetyPolicy")
    Assignment = apps.get_model("moderation", "SafetyPolicyAssignment")
    Tier = apps.get_model("portal", "Tier")
    for rule in RULES:
        SafetyRule.objects.update_or_create(name=rule["name"], defaults=rule)
    policies = {}
    for spec in POLICIES:
        policies[spec["slug"]], _ = SafetyPolicy.objects.update_or_create(
            slug=spec["slug"], defaults=spec
        )
    for tier in Tier.objects.filter(slug__in=TIER_POLICY):
        Assignment.objects.update_or_create(
            tier=tier, defaults={"policy": policies[TIER_POLICY[tier.slug]]}
        )


def unseed(apps, schema_editor):
    apps.get_model("moderation", "SafetyPolicyAssignment").objects.filter(tenant__isnull=True).delete()
    apps.get_model("moderation", "SafetyPolicy").objects.filter(
        slug__in=[p["slug"] for p in POLICIES], assignments__isnull=True
    ).delete()
    apps.get_model("moderation", "SafetyRule").objects.filter(
        name__in=[r["name"] for r in RULES]
    ).delete()


class Migration(migrations.Migration):
    dependencies = [("moderation", "0001_initial"), ("portal", "0002_seed_tiers")]
    operations = [migrations.RunPython(seed, unseed)]
