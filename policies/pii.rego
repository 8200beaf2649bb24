# No unredacted PII in outbound support or email messages: emails, card numbers, SSNs and phone
# numbers in any string of the body are refused. The audit trail's redaction masks
# ("[REDACTED:email]") count as PII too, so replaying a recorded call reaches the same verdict.
# Config: support_tools (names). A tool labelled tollgate.dev/kind=outbound-message applies too.
package tollgate

import rego.v1

pii_applies if input.tool.name in object.get(data.tollgate_config, "support_tools", [])

pii_applies if input.tool.labels["tollgate.dev/kind"] == "outbound-message"

pii_patterns := {
	"email address": `[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}`,
	"card number": `\b(?:\d[ -]?){12,18}\d\b`,
	"SSN": `\b\d{3}-\d{2}-\d{4}\b`,
	"phone number": `(?:\+\d{1,3}[ .-]?)?\(?\b\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b`,
	"redacted value": `\[REDACTED:[a-z]+\]`,
}

# Every string in the body, at any depth: supplied by the proxy (no `walk`, which the RVM
# the proxy evaluates on does not have).
deny contains msg if {
	pii_applies
	some s in input.request.body_strings
	some kind, pattern in pii_patterns
	regex.match(pattern, s)
	msg := sprintf("outbound message contains an unredacted %v; redact it before sending", [kind])
}
