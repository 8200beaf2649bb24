# No account switching: an agent acts as its own identity. Impersonation or act-as fields,
# switch/impersonate endpoints, and tools labelled tollgate.dev/kind=account-switch are refused.
package tollgate

import rego.v1

acct_switch_fields := ["act_as", "impersonate", "impersonate_user", "on_behalf_of", "switch_to_account", "sudo"]

deny contains msg if {
	some f in acct_switch_fields
	input.request.body[f]
	msg := sprintf("%v: field %v would act as another account; agents may not switch accounts", [input.tool.name, f])
}

deny contains msg if {
	regex.match(`(?i)/(impersonat|switch[_-]?account|act[_-]?as|sudo)`, input.request.path)
	msg := sprintf("%v: %v switches accounts; agents may not switch accounts", [input.tool.name, input.request.path])
}

deny contains msg if {
	input.tool.labels["tollgate.dev/kind"] == "account-switch"
	msg := sprintf("%v switches accounts; agents may not switch accounts", [input.tool.name])
}
