"""Two browsers on two socket pods chat through the load balancer and see each other's presence."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from tests.e2e.support import DELIVERY_MS, PRESENCE_MS, assert_recent, open_on_two_pods

TIME_TEXT = re.compile(r"^\d{1,2}:\d{2}:\d{2}(\s?[AP]M)?$")


def test_two_pages_on_two_pods_chat(pods_up, open_page, room):
    """A message typed on one pod's page appears on the other pod's page with its sender and time."""
    ada, grace = open_on_two_pods(open_page)
    ada.join("Ada", room)
    grace.join("Grace", room)
    # Each page is served by the pod its affinity cookie names, and they are different pods.
    assert ada.pod() == ada.affinity
    assert grace.pod() == grace.affinity
    assert ada.pod() != grace.pod()

    hello = ada.send("Hello from Ada")
    item = grace.message(hello)
    expect(item).to_have_count(1, timeout=DELIVERY_MS)
    expect(item).to_have_attribute("data-sub", "Ada")  # the verified sub of Ada's demo token
    expect(item).to_have_attribute("data-status", "delivered")
    expect(item.locator(".who")).to_have_text("Ada")
    expect(item.locator(".text")).to_have_text("Hello from Ada")
    expect(item.locator("time")).to_have_text(TIME_TEXT)
    assert_recent(item.locator("time").get_attribute("datetime") or "")

    reply = grace.send("Hi Ada, Grace here")
    expect(ada.message(reply).locator(".who")).to_have_text("Grace", timeout=DELIVERY_MS)

    for page in (ada, grace):
        page.expect_texts(["Hello from Ada", "Hi Ada, Grace here"])
        assert page.message_ids() == [hello, reply]
        messages = page.messages()
        assert [m["sub"] for m in messages] == ["Ada", "Grace"]
        assert [m["status"] for m in messages] == ["delivered", "delivered"]
        # Own messages are marked as such; the other's are not.
        expect(page.page.locator("#messages li.mine .who")).to_have_text([page.name])
    # The publish time is the same instant on both pages (stamped once, by the API).
    assert [m["datetime"] for m in ada.messages()] == [m["datetime"] for m in grace.messages()]


def test_presence_shows_both_names_on_both_pages(pods_up, open_page, room):
    """Both pages list both members and count two connections, across pods; a leave shows too."""
    ada, grace = open_on_two_pods(open_page)
    ada.join("Ada", room)
    grace.join("Grace", room)
    assert ada.pod() != grace.pod()

    for page in (ada, grace):
        members = page.page.locator("#presence-members li")
        expect(members).to_have_count(2, timeout=PRESENCE_MS)
        expect(page.page.locator('#presence-members li[data-sub="Ada"]')).to_have_count(1)
        expect(page.page.locator('#presence-members li[data-sub="Grace"]')).to_have_count(1)
        expect(page.page.locator(f'#presence-members li[data-sub="{page.name}"]')).to_have_text(
            f"{page.name} (you)"
        )
        expect(page.page.locator("#presence-count")).to_have_text("2", timeout=PRESENCE_MS)
    # Ada was there first: she saw Grace arrive (on the other pod) as one join event, and no
    # leave/join flicker from the periodic presence snapshots while Grace stayed.
    ada_saw_grace = ada.event("join").filter(has_text="Grace joined")
    expect(ada_saw_grace).to_have_count(1, timeout=PRESENCE_MS)
    expect(ada.event("leave").filter(has_text="Grace left")).to_have_count(0)

    grace.page.click("#leave-button")
    expect(grace.page.locator("#join-form")).to_be_visible()
    expect(ada.page.locator("#events li").first).to_have_text(
        re.compile("Grace left$"), timeout=PRESENCE_MS
    )
    expect(ada.page.locator("#presence-members li")).to_have_text(["Ada (you)"])
    expect(ada.page.locator("#presence-count")).to_have_text("1", timeout=PRESENCE_MS)
    expect(ada.event("leave").filter(has_text="Grace left")).to_have_count(1)
    expect(ada_saw_grace).to_have_count(1)


def test_someone_who_joins_a_room_sees_its_last_50_messages(pods_up, open_page, room, publisher):
    """The demo joins with a rewind of 50: a newcomer on either pod sees the room's last 50
    messages in order, then live ones, each once."""
    ada, grace = open_on_two_pods(open_page)  # already there: they see everything live
    ada.join("Ada", room)
    grace.join("Grace", room)
    ids = [publisher.publish(ada.channel, f"message {n}") for n in range(55)]
    for page in (ada, grace):  # both pods hold all 55 now
        expect(page.message(ids[-1])).to_have_count(1, timeout=DELIVERY_MS)
        assert page.message_ids() == ids
    ann, bob = open_on_two_pods(open_page)
    for page, name in ((ann, "Ann"), (bob, "Bob")):
        page.join(name, room)
        expect(page.message_items).to_have_count(50, timeout=DELIVERY_MS)
        assert page.message_ids() == ids[5:]
        assert [m["text"] for m in page.messages()][:2] == ["message 5", "message 6"]
        assert page.event_texts("rewound") == ["50 earlier messages of the room"]
    assert ann.pod() != bob.pod()
    live = publisher.publish(ada.channel, "live")
    for page in (ann, bob):
        expect(page.message(live)).to_have_count(1, timeout=DELIVERY_MS)
        assert page.message_ids() == [*ids[5:], live]
