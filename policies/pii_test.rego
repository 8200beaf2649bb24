package tollgate_test

import rego.v1

macro(body) := {"tenant": {"id": "acme_co"}, "tool": {"name": "support.send_macro", "risk": {"financial": false, "reversible": false}, "labels": {"tollgate.dev/kind": "outbound-message"}}, "request": {"method": "POST", "path": "/", "headers": {}, "query": {}, "body": body, "body_strings": [s | some s in body; is_string(s)]}, "agent": {"name": "a", "labels": {}}}

test_email_denied if {
	count(data.tollgate.deny) >= 1 with input as macro({"text": "write to a.b@example.org"})
}

test_phone_denied if {
	count(data.tollgate.deny) >= 1 with input as macro({"text": "call (555) 123-4567"})
}

test_clean_text_allowed if {
	count(data.tollgate.deny) == 0 with input as macro({"text": "Your refund of 120 USD was issued."})
}

test_non_outbound_tools_unaffected if {
	lookup := json.patch(macro({"text": "a.b@example.org"}), [{"op": "replace", "path": "/tool", "value": {"name": "crm.lookup", "risk": {"financial": false, "reversible": true}, "labels": {}}}])
	count(data.tollgate.deny) == 0 with input as lookup
}
